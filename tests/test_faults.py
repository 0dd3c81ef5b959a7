"""Faults never become results: diverged training stops with an error naming the setting,
broken models are not scored, the store refuses non-finite or foreign files, cleans up after
killed writers and keeps a built result when it cannot save it."""
import dataclasses
import os
import pickle
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from mesa_utils import store as store_module
from mesa_utils.config import BaselineConfig, MesaConfig, NeuralCleanseConfig, TrainConfig
from mesa_utils.defense import neural_cleanse, reverse_triggers
from mesa_utils.mesa import Member, mesa_bank
from mesa_utils.store import NonFiniteError, StaleCacheError, Store, atomic_write
from mesa_utils.train import (CHECK_EVERY, FiniteGuard, attack_stats, backdoored_model, fit,
                              original_source)

from .conftest import BrightPatchModel


class NaNModel(nn.Module):
    """A broken classifier: every logit is NaN (as after a diverged training run)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x.mean((1, 2, 3))[:, None].expand(-1, self.num_classes) * self.weight * float("nan")


# ---------------------------------------------------------------------------------------------
# Training loops

def test_guard_reports_the_first_bad_step_at_its_next_check():
    guard = FiniteGuard("demo", 2 * CHECK_EVERY, "Lower demo.lr.", "cpu")
    for step in range(CHECK_EVERY - 1):         # no host read before the check step
        guard.watch(step, torch.tensor(float("nan") if step == 6 else 1.0))
    with pytest.raises(NonFiniteError, match=f"demo: .* at step 7 of {2 * CHECK_EVERY}.*"
                                             "Lower demo.lr"):
        guard.watch(CHECK_EVERY - 1, torch.tensor(1.0))


def test_guard_checks_the_final_parameters():
    guard = FiniteGuard("demo", 3, "Lower demo.lr.", "cpu")
    with pytest.raises(NonFiniteError, match="layer.weight hold non-finite"):
        guard.finish([("layer.weight", torch.tensor([1.0, float("inf")])),
                      ("counter", torch.tensor(3))])


def test_diverged_fit_names_the_stage_step_and_setting(toy_ctx):
    with pytest.raises(NonFiniteError, match=r"attack 170: the loss became non-finite .* "
                                             r"Lower attack.lr \(now 1e\+30\)"):
        fit(toy_ctx, toy_ctx.new_classifier(), toy_ctx.splits.train_images, toy_ctx.splits.train_labels,
            TrainConfig(epochs=1, batch_size=8, lr=1e30), "attack", desc="attack 170")


def test_diverged_attack_stores_no_model(toy_ctx):
    cfg = dataclasses.replace(toy_ctx.cfg, attack=dataclasses.replace(toy_ctx.cfg.attack,
                                                                      lr=1e30))
    ctx = dataclasses.replace(toy_ctx, cfg=cfg)
    with pytest.raises(NonFiniteError, match="attack.lr"):
        backdoored_model(ctx, 170)
    assert (ctx.store.root / "clean").is_dir()              # the healthy clean model is kept
    assert not (ctx.store.root / "backdoor").exists()       # the diverged one is not


def test_diverged_mesa_bank_is_an_error_and_stores_nothing(toy_ctx):
    ctx = dataclasses.replace(toy_ctx, cfg=dataclasses.replace(toy_ctx.cfg, mesa=MesaConfig(
        steps=25, batch_size=32, hidden=32, lr=1000.0, eval_samples=64)))
    with pytest.raises(NonFiniteError, match=r"nats, below the floor .* Lower mesa.lr \(now "
                                             r"1000\) or the entropy weight alpha"):
        mesa_bank(ctx, BrightPatchModel(), "parent", [Member(0.8, 0.1, 0)])
    assert not (ctx.store.root / "mesa").exists()


def test_baseline_reversal_on_a_broken_model_is_an_error(toy_ctx):
    with pytest.raises(NonFiniteError, match="baseline reversal: .* Lower baseline.lr"):
        reverse_triggers(toy_ctx, NaNModel(), 0, BaselineConfig(starts=2, steps=3,
                                                                batch_size=4),
                         toy_ctx.splits.defense_images)


def test_neural_cleanse_on_a_broken_model_is_an_error(toy_ctx):
    with pytest.raises(NonFiniteError, match="Neural Cleanse: .* Lower neural_cleanse.lr"):
        neural_cleanse(toy_ctx, NaNModel(), NeuralCleanseConfig(steps=3, batch_size=4),
                       toy_ctx.splits.defense_images)


def test_a_broken_model_is_not_scored(toy_ctx):
    # argmax of an all-NaN row is class 0: without the check this reads as 100% ASR on 0.
    assert int(torch.tensor([[float("nan")] * 3]).argmax(1)) == 0
    with pytest.raises(NonFiniteError, match="softmax is NaN or inf on 64 of 64 images"):
        attack_stats(toy_ctx, NaNModel(), toy_ctx.splits.eval_images,
                     toy_ctx.splits.eval_labels, original_source(170), target=0)


# ---------------------------------------------------------------------------------------------
# The store

def test_store_refuses_to_save_non_finite_values(tmp_path):
    store = Store(tmp_path)
    payload = {"history": [{"loss": 0.5}, {"loss": float("nan")}], "w": torch.ones(2)}
    with pytest.raises(NonFiniteError, match="history.1.loss"):
        store.save("demo", {"a": 1}, payload)
    with pytest.raises(NonFiniteError, match="state.w"):
        store.save("demo", {"a": 1}, {"state": {"w": torch.tensor([1.0, float("inf")])}})
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.tmp"))


def test_store_refuses_to_load_a_non_finite_artefact(tmp_path):
    store = Store(tmp_path)
    spec = {"a": 1}
    path = store.save("demo", spec, {"w": torch.ones(2)})
    torch.save({"spec": store_module._canonical(spec), "payload": {"w": torch.full((2,),
                                                                                    float("nan"))}},
               path)
    with pytest.raises(StaleCacheError, match="non-finite values in w.*Delete it"):
        store.load("demo", spec)


class _RunsCode:
    """Unpickling this object runs code (writes a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_store_never_runs_code_from_a_foreign_file(tmp_path):
    store = Store(tmp_path / "store")
    spec = {"a": 1}
    marker = tmp_path / "code-ran"
    store.path("demo", spec).parent.mkdir(parents=True)
    with open(store.path("demo", spec), "wb") as f:
        pickle.dump({"spec": store_module._canonical(spec), "payload": _RunsCode(str(marker))}, f,
                    protocol=2)
    with pytest.raises(StaleCacheError, match="cannot read cached demo"):
        store.load("demo", spec)
    assert not marker.exists()


def test_atomic_write_flushes_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", spy)
    atomic_write(tmp_path / "out.bin", lambda f: f.write(b"data"))
    assert (tmp_path / "out.bin").read_bytes() == b"data"
    assert synced[-1] == str(tmp_path) and synced[0].endswith(".tmp")


def test_temporary_files_of_killed_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    host = socket.gethostname()
    leftover = tmp_path / f"model.pt.~{int(dead.stdout)}@{host}~abc.tmp"
    live = tmp_path / f"model.pt.~{os.getpid()}@{host}~def.tmp"
    other_host = tmp_path / f"model.pt.~{int(dead.stdout)}@elsewhere~ghi.tmp"
    for path in (leftover, live, other_host):
        path.write_bytes(b"half")
    atomic_write(tmp_path / "next.pt", lambda f: f.write(b"x"))
    assert not leftover.exists()                      # its writer is gone
    assert live.exists() and other_host.exists()      # a live writer's, another machine's


def test_a_full_disk_inside_torch_save_leaves_the_result_used_and_no_file(tmp_path, monkeypatch):
    def full_disk(record, file):
        file.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    store = Store(tmp_path)
    with pytest.warns(UserWarning, match="built but NOT cached .*the disk may be full"):
        payload = store.get_or_build("demo", {"a": 1}, lambda: {"value": 3})
    assert payload == {"value": 3}
    assert list((tmp_path / "demo").iterdir()) == []          # no half-written file kept
    monkeypatch.setattr(torch, "save", lambda record, file: (_ for _ in ()).throw(
        RuntimeError("some other torch failure")))
    with pytest.raises(RuntimeError, match="some other torch failure"):   # not hidden
        store.get_or_build("demo", {"a": 2}, lambda: {"value": 4})


def test_a_result_that_cannot_be_saved_is_still_used(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    store = Store(blocker)
    with pytest.warns(UserWarning, match="built but NOT cached .* this run uses it"):
        payload = store.get_or_build("demo", {"a": 1}, lambda: {"value": 3})
    assert payload == {"value": 3}
