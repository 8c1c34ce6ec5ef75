"""FSDP wrapping and activation checkpointing that follow the loaded model.

A YAML config cannot name the decoder layer of a checkpoint's own modelling
code: Dream's ``DreamDecoderLayer`` lives in a module transformers creates when
the model loads. Naming transformers' ``Qwen2DecoderLayer`` instead matches
nothing in Dream, so the whole 7B model becomes one FSDP unit (gathered whole
on every GPU for each forward) and no layer is checkpointed. Every transformers
model already lists the classes that must stay whole in ``_no_split_modules``
(Qwen2: ``Qwen2DecoderLayer``, Dream: ``DreamDecoderLayer``); those are the
units. Pure torch: no Lightning import.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp.wrap import ModuleWrapPolicy


def no_split_names(root: torch.nn.Module) -> set[str]:
    """Class names that the models inside ``root`` declare in ``_no_split_modules``."""
    names: set[str] = set()
    for module in root.modules():
        names |= declared(module)
    return names


def declared(module: torch.nn.Module) -> set[str]:
    """The ``_no_split_modules`` of one module (a transformers model), empty for any other."""
    return {str(n) for n in getattr(module, "_no_split_modules", None) or ()}


def is_named(module: torch.nn.Module, names: set[str]) -> bool:
    """Whether the module's class, or a class it derives from, is one of ``names``.

    Base classes count as they do for a set of classes (``isinstance``).
    """
    return any(cls.__name__ in names for cls in type(module).__mro__)


class NoSplitModulesPolicy(ModuleWrapPolicy):
    """Wrap every module whose class the model names in ``_no_split_modules``.

    For Lightning's ``FSDPStrategy(auto_wrap_policy=..., activation_checkpointing_policy=...)``;
    in YAML ``{class_path: pdlightning.model.fsdp.NoSplitModulesPolicy}`` for
    each. The names are read from the model when it is wrapped, so one config
    serves Qwen2, Dream or Llama. It derives from ``ModuleWrapPolicy`` because
    that, a set of classes or a plain callable is what ``FSDPStrategy``
    accepts for these arguments, and jsonargparse checks the config against it.

    FSDP calls :meth:`_run_policy` with the whole model; activation
    checkpointing (``apply_activation_checkpointing``) calls the policy itself,
    module by module from the root down (see :meth:`__call__`).
    """

    def __init__(self) -> None:
        super().__init__(set())
        self._names: set[str] = set()

    def _run_policy(
        self, root_module: torch.nn.Module, ignored_modules: set[torch.nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[torch.nn.Module, dict[str, Any]]:
        """The modules to wrap (each with the root's kwargs), the names read from ``root_module``.

        Raises:
            ValueError: No model inside declares ``_no_split_modules``, or no
                module is of a class declared: wrapping nothing would make the
                whole model one FSDP unit (one line, naming what was found).
        """
        self._names = no_split_names(root_module)
        if not self._names:
            raise ValueError(
                f"NoSplitModulesPolicy: no model inside {type(root_module).__name__} declares _no_split_modules; "
                "name its layer classes in the strategy instead (auto_wrap_policy: [package.module.LayerClass])"
            )
        self._module_classes = {type(m) for m in root_module.modules() if is_named(m, self._names)}
        self._module_classes_str = str(self._module_classes)
        if not self._module_classes:
            raise ValueError(f"NoSplitModulesPolicy: the model declares _no_split_modules {sorted(self._names)}, "
                             "but no module is of those classes")
        return super()._run_policy(root_module, ignored_modules, root_kwargs)

    def __call__(self, module: torch.nn.Module, recurse: bool, *args: Any, **kwargs: Any) -> bool:
        """The ``(module, recurse, nonwrapped_numel)`` form of a policy.

        Recursion reaches a module (``recurse=True``) before any of its
        children is decided (``recurse=False``), so a transformers model's
        names are collected before its layers are met.
        """
        if recurse:
            self._names |= declared(module)
            return True
        return is_named(module, self._names)
