"""Shared pieces of the muxtune.io/v1alpha1 resources.

Kept free of heavy imports: the operator, the engine and the CRD generator all load it.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "muxtune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Timestamps arrive as RFC 3339 strings in the API server's JSON (the operator parses objects
# through these models), so they alone stay lax; every other field is strict, as the CRD is.
Timestamp = Annotated[datetime, Field(strict=False)]


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors, not silence.

    Strict types: the CRD's JSON schema refuses "4" for an integer and 1 for a boolean, so local
    validation refuses them too instead of coercing (an int is still a valid float, as in JSON).
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        strict=True,
    )

    def to_wire(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ObjectMeta(BaseModel):
    """The slice of Kubernetes ObjectMeta muxtune reads; everything else passes through."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, strict=True)

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Object name (a DNS-1123 label: it becomes part of pod and file names).",
    )
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None


class Condition(ApiModel):
    """A Kubernetes-style status condition."""

    type: str = Field(description="Condition type, e.g. Ready, Placed, Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase machine-readable reason.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: Timestamp | None = Field(
        default=None, description="When the status last changed."
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation the condition was set from."
    )
