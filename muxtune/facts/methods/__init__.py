"""The PEFT method registry and the built-in methods' declarations (registered on import).

A new method is one module here (or anywhere imported before muxtune.api):

    @register_peft_method
    class MyDecl(PeftMethodDecl):
        name, title = "my_method", "my method"
        owns = ("my_field",)                    # a PeftSpec field only this method may set
        peft_type = "MY_METHOD"                 # adapter directories the server can load
        @staticmethod
        def peft_config(spec, base_model_path): from peft import ...; return ...
        @staticmethod
        def linear_params(shape, m, tp=1): return m.d_out   # its memory shape

and its deltas in engine/peft/ (``@implements(MyDecl)`` on an engine PeftMethod).
"""
# registration order is the API's order of methods
from muxtune.facts.methods import lora  # noqa: F401  isort: skip
from muxtune.facts.methods import ia3  # noqa: F401  isort: skip
from muxtune.facts.methods import prompt_tuning  # noqa: F401  isort: skip
from muxtune.facts.methods.base import Linear, PeftMethodDecl
from muxtune.facts.methods.registry import (DEFAULT_METHOD, get_peft_method, method_for_peft_type, peft_method_names,
                                            peft_methods, register_peft_method)

__all__ = ["DEFAULT_METHOD", "Linear", "PeftMethodDecl", "get_peft_method", "method_for_peft_type", "peft_method_names",
           "peft_methods", "register_peft_method"]
