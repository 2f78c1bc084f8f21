"""Torch threads per step: the flag, then the stage's own variable, then the deployment's."""

import argparse

import pytest

from tasks.common import threads_for


def test_the_flag_wins_then_the_stage_variable_then_hfi_threads_then_one(monkeypatch):
    monkeypatch.delenv("HFI_THREADS", raising=False)
    monkeypatch.delenv("HFI_THREADS_DISTILL", raising=False)
    none = argparse.Namespace(threads=None)
    assert threads_for(none, "distill") == 1
    monkeypatch.setenv("HFI_THREADS", "2")
    assert threads_for(none, "distill") == 2 and threads_for(none) == 2
    monkeypatch.setenv("HFI_THREADS_DISTILL", "1")
    assert threads_for(none, "distill") == 1 and threads_for(none, "generate") == 2
    assert threads_for(argparse.Namespace(threads=3), "distill") == 3


def test_a_thread_count_that_is_not_a_number_names_its_variable(monkeypatch):
    monkeypatch.setenv("HFI_THREADS_EVALUATE", "two")
    with pytest.raises(ValueError, match=r"HFI_THREADS_EVALUATE='two'"):
        threads_for(argparse.Namespace(threads=None), "evaluate")
