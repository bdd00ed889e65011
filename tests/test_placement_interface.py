"""Every placement implements `placement.interface` whole: each Protocol method, with the
Protocol's parameters (an implementation may add optional ones), and each attribute.

The Protocols are not inherited, so nothing else would notice a placement that lost a method or
renamed a keyword until the loop called it on a cluster.
"""

from __future__ import annotations

import inspect

import pytest

from qerl_rollout.placement import interface
from qerl_rollout.placement.local import LocalPlacement, LocalRollout
from qerl_rollout.placement.ray import EnginePool, RayPlacement
from qerl_rollout.placement.trainer import PolicyTrainer
from qerl_rollout.workers.trainer import RayTrainer

IMPLEMENTATIONS = [
    (interface.Trainer, PolicyTrainer), (interface.Trainer, RayTrainer),
    (interface.Rollout, LocalRollout), (interface.Rollout, EnginePool),
    (interface.Placement, LocalPlacement), (interface.Placement, RayPlacement),
]


def _members(protocol) -> tuple[dict[str, inspect.Signature], list[str]]:
    methods = {name: inspect.signature(fn) for name, fn in vars(protocol).items()
               if inspect.isfunction(fn) and not name.startswith("_")}
    return methods, list(protocol.__annotations__)


def problems(protocol, cls) -> list[str]:
    """What `cls` lacks of `protocol`, one line each."""
    methods, attributes = _members(protocol)
    out = []
    for name, wanted in methods.items():
        fn = getattr(cls, name, None)
        if fn is None:
            out.append(f"no {name}()")
            continue
        got = inspect.signature(fn).parameters
        for param in wanted.parameters.values():
            if param.name not in got:
                out.append(f"{name}() lacks {param.name}")
            elif (param.default is inspect.Parameter.empty) != (got[param.name].default is inspect.Parameter.empty):
                out.append(f"{name}({param.name}) is {'optional' if param.default is inspect.Parameter.empty else 'required'}")
        extra = [p for p in got.values() if p.name not in wanted.parameters and p.name != "self"
                 and p.default is inspect.Parameter.empty
                 and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        out += [f"{name}() requires {p.name}" for p in extra]
    source = inspect.getsource(cls)
    out += [f"no attribute {a}" for a in attributes if not hasattr(cls, a) and f"self.{a} =" not in source
            and f"self.{a}," not in source]
    return out


def test_the_checker_sees_a_missing_method_a_renamed_keyword_and_a_missing_attribute():
    class Broken:
        def generate(self, prompts, **sampling): ...

        def score(self, prompt_token_ids, response_token_ids, extra): ...

        def close(self): ...

    assert problems(interface.Rollout, Broken) == [
        "generate() lacks prompt_token_ids", "generate() requires prompts", "score() requires extra",
        "no score_each()", "no attribute receiver"]


@pytest.mark.parametrize("protocol, cls", IMPLEMENTATIONS, ids=lambda v: v.__name__)
def test_implements_the_interface(protocol, cls):
    assert problems(protocol, cls) == []
