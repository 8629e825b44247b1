"""The float32 dot precision the Triton kernels take from torch's TF32 settings (host code: runs
without a GPU, in the plain and the interpreted test run alike).

`dot_precision` is "ieee" whenever the kernels run in Triton's interpreter, so no interpreted
kernel test can see which precision a GPU launch would get: these tests take the interpreter
short-circuit away (INTERPRET patched to False) and check the decision for each way of setting
TF32, and restore every setting they touch.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from cumo_kernels.triton import _common  # noqa: E402

_MATMUL = torch.backends.cuda.matmul
_HAS_NEW_API = hasattr(torch.backends, "fp32_precision")


def _snapshot() -> dict:
    """Every setting these tests change: the legacy float32 matmul precision (None where the
    settings are already mixed and torch refuses to say it) and the new API's own values (not
    the inherited ones: the global is set to "none" while they are read)."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
    if not _HAS_NEW_API:
        return {"legacy": legacy, "allow_tf32": _MATMUL.allow_tf32}
    generic = torch.backends.fp32_precision
    torch.backends.fp32_precision = "none"
    try:
        own = {"cuda": _MATMUL.fp32_precision, "mkldnn": torch.backends.mkldnn.matmul.fp32_precision}
    finally:
        torch.backends.fp32_precision = generic
    return {"legacy": legacy, "generic": generic, **own}


def _restore(s: dict) -> None:
    if s["legacy"] is not None:
        # first: it writes through to the new API's cuda and mkldnn matmul values, set next
        torch.set_float32_matmul_precision(s["legacy"])
    if not _HAS_NEW_API:
        _MATMUL.allow_tf32 = s["allow_tf32"]
        return
    _MATMUL.fp32_precision = s["cuda"]
    torch.backends.mkldnn.matmul.fp32_precision = s["mkldnn"]
    torch.backends.fp32_precision = s["generic"]


@pytest.fixture
def torch_settings(monkeypatch):
    """Restores torch's TF32 settings after the test (and checks they were restored); the
    decision is taken as on a GPU, not as in the interpreter."""
    monkeypatch.setattr(_common, "INTERPRET", False)
    saved = _snapshot()
    try:
        yield
    finally:
        _restore(saved)
        assert _snapshot() == saved, "torch's TF32 settings were not restored"


def _legacy(on: bool):
    def set_():
        _MATMUL.allow_tf32 = on

    return set_


def _matmul(p: str):
    def set_():
        _MATMUL.fp32_precision = p

    return set_


def _generic(p: str):
    def set_():
        torch.backends.fp32_precision = p

    return set_


def _highlevel(p: str):
    return lambda: torch.set_float32_matmul_precision(p)


def _transformers(on: bool):
    def set_():
        import_utils = pytest.importorskip("transformers.utils.import_utils")
        enable = getattr(import_utils, "enable_tf32", None)
        if enable is None:
            pytest.skip("this transformers has no enable_tf32")
        getattr(enable, "__wrapped__", enable)(on)  # past its lru_cache: each call sets

    return set_


# (id, settings applied in order, the precision of a float32 dot)
CASES = [
    ("default", [], "ieee"),
    ("legacy-allow_tf32", [_legacy(True)], "tf32"),
    ("legacy-off", [_legacy(False)], "ieee"),
    ("legacy-on-off", [_legacy(True), _legacy(False)], "ieee"),
    ("float32_matmul_precision-high", [_highlevel("high")], "tf32"),
    ("float32_matmul_precision-medium", [_highlevel("medium")], "tf32"),
    ("float32_matmul_precision-high-highest", [_highlevel("high"), _highlevel("highest")], "ieee"),
]
NEW_API_CASES = [
    ("matmul-tf32", [_matmul("tf32")], "tf32"),
    ("matmul-ieee", [_matmul("ieee")], "ieee"),
    ("matmul-tf32-none", [_matmul("tf32"), _matmul("none")], "ieee"),
    ("global-tf32", [_generic("tf32")], "tf32"),
    ("global-ieee", [_generic("ieee")], "ieee"),
    ("transformers-tf32", [_transformers(True)], "tf32"),
    ("transformers-ieee", [_transformers(False)], "ieee"),
    # the matmul setting is the more specific one: it wins over the global
    ("global-tf32-matmul-ieee", [_generic("tf32"), _matmul("ieee")], "ieee"),
    ("global-ieee-matmul-tf32", [_generic("ieee"), _matmul("tf32")], "tf32"),
    # both APIs, mixed: the later setting of the matmul value wins
    ("legacy-on-matmul-ieee", [_legacy(True), _matmul("ieee")], "ieee"),
    ("matmul-tf32-legacy-off", [_matmul("tf32"), _legacy(False)], "ieee"),
    ("legacy-off-matmul-tf32", [_legacy(False), _matmul("tf32")], "tf32"),
    ("legacy-on-global-ieee", [_legacy(True), _generic("ieee")], "tf32"),
]
if _HAS_NEW_API:
    CASES += NEW_API_CASES


@pytest.mark.parametrize("settings,want", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_triton_dot_precision_follows_torch_tf32_settings(torch_settings, settings, want):
    for set_ in settings:
        set_()
    assert _common.dot_precision(torch.float32) == want
    assert _common.tf32_allowed() == (want == "tf32")
    # float16 / bfloat16 dots take no input precision: "ieee" whatever the settings
    assert _common.dot_precision(torch.float16) == "ieee"
    assert _common.dot_precision(torch.bfloat16) == "ieee"
    # where torch still answers the legacy question (the two APIs agree), it answers the same
    try:
        legacy = _MATMUL.allow_tf32
    except RuntimeError:
        return
    assert legacy == (want == "tf32")


@pytest.mark.parametrize("settings", [[], [_legacy(True)], *([[_matmul("tf32")], [_generic("tf32")]] * _HAS_NEW_API)])
def test_triton_dot_precision_ieee_in_the_interpreter(torch_settings, monkeypatch, settings):
    """The interpreter computes dots in float32 whatever they ask for: "ieee" there."""
    monkeypatch.setattr(_common, "INTERPRET", True)
    for set_ in settings:
        set_()
    assert _common.dot_precision(torch.float32) == "ieee"


class _LegacyOnlyMatmul:
    """torch.backends.cuda.matmul of a torch without the fp32_precision API."""

    def __init__(self, allow_tf32: bool):
        self.allow_tf32 = allow_tf32

    def __getattr__(self, name):
        raise AttributeError("Unknown attribute " + name)


@pytest.mark.parametrize("allow,want", [(False, "ieee"), (True, "tf32")])
def test_triton_dot_precision_legacy_only_torch(torch_settings, monkeypatch, allow, want):
    monkeypatch.setattr(torch.backends.cuda, "matmul", _LegacyOnlyMatmul(allow))
    assert _common.dot_precision(torch.float32) == want
    assert _common.dot_precision(torch.float16) == "ieee"
