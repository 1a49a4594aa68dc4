"""The PEFT method registry (muxtune.facts.methods): the API's methods and per-method rules come
from it, a new method registers itself, and the shared facts and the operator stay torch-free."""
from __future__ import annotations

import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import ValidationError

from muxtune.api.finetunetask import PeftMethod, PeftSpec
from muxtune.facts.methods import PeftMethodDecl, get_peft_method, peft_method_names, register_peft_method

REPO = Path(__file__).resolve().parents[2]


def test_api_methods_are_the_registered_ones():
    assert typing.get_args(PeftMethod) == peft_method_names() == ("lora", "ia3", "prompt_tuning")
    assert PeftSpec(method="prompt_tuning", num_virtual_tokens=3).virtual_tokens == 3
    assert PeftSpec().virtual_tokens == 0


@pytest.mark.parametrize("peft, message", [
    ({"method": "ia3", "useDora": True}, "useDora applies to method lora"),
    ({"method": "prompt_tuning"}, "method prompt_tuning needs numVirtualTokens"),
    ({"method": "lora", "promptTuningInit": "RANDOM"},
     "numVirtualTokens, promptTuningInit and promptTuningInitText are for prompt_tuning only"),
])
def test_rules_from_declarations_refuse_with_the_same_words(peft, message):
    with pytest.raises(ValidationError, match=message):
        PeftSpec.model_validate(peft)


def test_a_name_registers_once():
    decl = get_peft_method("lora")
    assert register_peft_method(decl) is decl  # the same declaration again: harmless

    class Other(PeftMethodDecl):
        name = "lora"

    with pytest.raises(ValueError, match="already registered"):
        register_peft_method(Other)


NEW_METHOD = """
from muxtune.facts.methods import PeftMethodDecl, register_peft_method

@register_peft_method
class Toy(PeftMethodDecl):
    name, title = "toy", "toy scaling"

    @staticmethod
    def linear_params(shape, m, tp=1):
        return m.d_out

import json
from pydantic import ValidationError
from muxtune.api.crdgen import RESOURCES, crd
from muxtune.api.finetunetask import PeftSpec
from muxtune.operator.memory import BUILTIN_ARCHITECTURES, TaskShape, trainable_params
peft = crd(RESOURCES[0])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["peft"]
try:
    PeftSpec(method="toy", num_virtual_tokens=3)
    refused = None
except ValidationError as exc:
    refused = str(exc)
print(json.dumps({
    "enum": peft["properties"]["method"]["enum"],
    "params": trainable_params(TaskShape(method="toy", target_modules=("q_proj",)), BUILTIN_ARCHITECTURES["tiny-llama"]),
    "spec": PeftSpec(method="toy").method,
    "refused": refused,
}))
"""


def test_a_new_method_registers_itself_everywhere():
    """Declared before the API is imported, a method is a value of the CRD's method enum, the other
    methods' own fields stay theirs, and the memory model sizes it from its declared shape."""
    out = json.loads(subprocess.run([sys.executable, "-c", NEW_METHOD], cwd=REPO, capture_output=True, text=True,
                                    check=True).stdout)
    assert out["enum"] == ["lora", "ia3", "prompt_tuning", "toy"]
    assert out["spec"] == "toy"
    assert "are for prompt_tuning only" in out["refused"]
    assert out["params"] == 128 * 4  # d_out of q_proj in each of tiny-llama's 4 layers


def test_facts_and_the_operator_import_no_torch():
    code = """
import importlib, pkgutil, sys
import muxtune.facts, muxtune.operator
for pkg in (muxtune.facts, muxtune.operator):
    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(mod.name)
print(sorted(m for m in ("torch", "transformers", "peft", "safetensors") if m in sys.modules))
print(sorted(m for m in sys.modules if m.startswith("muxtune.engine")))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout
