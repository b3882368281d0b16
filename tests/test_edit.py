"""The Qt-free editing core (cryoves.edit): edits, stable ids, exact undo/redo, edit log, review queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from cryoves.edit import DuplicateVesicle, EditEvent, NoMembraneFound, VesicleEditor, edit_log_info
from cryoves.io import read_vesicles_csv
from cryoves.table import COLUMNS, VesicleTable, render_labels

from _synthetic import draw_vesicles, random_vesicles

VOXEL = 2.0
SHAPE = (64, 128, 128)
N_BASE = 22          # vesicles 0..21 are in the base table, 22..29 are "missed" (for add_at)


@pytest.fixture(scope="module")
def scene():
    centers, radii = random_vesicles(SHAPE, 30, r_range=(7, 11), seed=0)
    tomo = draw_vesicles(SHAPE, centers, radii, thickness=2.0, noise=1.0, seed=5)
    tomo.setflags(write=False)
    base = VesicleTable.from_arrays(centers[:N_BASE], radii[:N_BASE], voxel_size=VOXEL, stage="refine",
                                    pvalue=np.linspace(0.001, 0.9, N_BASE))
    return tomo, centers, radii, base


def same_table(a: VesicleTable, b: VesicleTable) -> bool:
    """Equal bit for bit (every column, NaN payloads included)."""
    if len(a) != len(b) or a.voxel_size != b.voxel_size:
        return False
    for name, dtype in COLUMNS.items():
        if dtype is object:
            if a[name].tolist() != b[name].tolist():
                return False
        elif a[name].dtype != b[name].dtype or a[name].tobytes() != b[name].tobytes():
            return False
    return True


def editor(scene, **kw):
    tomo, _, _, base = scene
    return VesicleEditor(tomo, base, VOXEL, **kw)


# ---------------------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------------------
def test_construction_renders_labels_and_validates(scene):
    tomo, centers, radii, base = scene
    ed = editor(scene)
    assert np.array_equal(ed.labels, render_labels(base, SHAPE))
    assert same_table(ed.table, base) and not ed.can_undo and not ed.can_redo and ed.n_edits == 0
    with pytest.raises(ValueError, match="voxel_size"):
        VesicleEditor(tomo, base, 1.0)
    with pytest.raises(ValueError, match="duplicate"):
        VesicleEditor(tomo, VesicleTable.concat([base, base]), VOXEL)
    with pytest.raises(ValueError, match="labels shape"):
        VesicleEditor(tomo, base, VOXEL, labels=np.zeros((4, 4, 4), np.uint16))
    with pytest.raises(ValueError, match="3-D"):
        VesicleEditor(tomo[0], base, VOXEL)
    # given labels are copied, never written
    lab = render_labels(base, SHAPE)
    lab.setflags(write=False)
    ed2 = VesicleEditor(tomo, base, VOXEL, labels=lab)
    ed2.remove(1)
    assert (lab == 1).any() and not (ed2.labels == 1).any()


# ---------------------------------------------------------------------------------------------
# edits
# ---------------------------------------------------------------------------------------------
def test_add_at_fits_paints_and_gets_next_id(scene):
    tomo, centers, radii, base = scene
    ed = editor(scene)
    events = []
    ed.on_change(events.append)
    k = N_BASE + 1
    vid = ed.add_at(centers[k] + np.array([1.0, -1.0, 0.5]))
    assert vid == base.next_id() == N_BASE + 1
    row = ed.row(vid)
    assert np.linalg.norm(np.array([row["z"], row["y"], row["x"]]) - centers[k]) < 1.0
    assert abs(row["radius"] - radii[k]) < 1.0
    assert row["stage"] == "editor" and row["status"] == "accepted" and np.isfinite(row["thickness"])
    assert ed.id_at(centers[k]) == vid
    assert np.array_equal(ed.labels, render_labels(ed.table, SHAPE))
    assert list(ed.table.ids[:N_BASE]) == list(base.ids)     # nothing renumbered
    assert events == [EditEvent("add", (vid,), events[0].box, "add")]
    box = events[0].box
    outside = np.ones(SHAPE, bool)
    outside[box] = False
    assert np.array_equal(ed.labels[outside], render_labels(base, SHAPE)[outside])
    assert ed.add_at(centers[k + 1]) == vid + 1
    # clicking on a vesicle already there fits it again: refused, nothing changes
    n = ed.n_edits
    with pytest.raises(DuplicateVesicle, match="vesicle 3 already") as info:
        ed.add_at(centers[2] + 1.0)
    assert info.value.existing_id == 3 and abs(info.value.fit["radius"] - radii[2]) < 1
    assert ed.n_edits == n


def test_add_at_tries_half_the_radii_and_fits_the_same_sphere(scene, monkeypatch):
    """The click fit starts with a coarser radius search than fit_sphere_at's default (a faster
    click) and ends on the same sphere (the radial-profile iterations measure the radius)."""
    import cryoves.refine as refine

    tomo, centers, radii, base = scene
    tried = []
    capture = refine._capture

    def counting(tomogram, center, trial_radii, *args):
        tried.append(len(trial_radii))
        return capture(tomogram, center, trial_radii, *args)

    monkeypatch.setattr(refine, "_capture", counting)
    ed = editor(scene)
    for k, off in ((N_BASE + 2, [0.5, 1.0, -1.0]), (N_BASE + 3, [-1.5, 0.0, 2.0])):
        click = centers[k] + np.array(off)
        row = ed.row(ed.add_at(click))
        n_click = tried[-1]
        full = refine.fit_sphere_at(tomo, click, VOXEL, max_diameter_nm=50.0, normalization=ed.normalization)
        assert n_click <= (tried[-1] + 1) // 2
        assert np.linalg.norm(np.array([row["z"], row["y"], row["x"]]) - full.centers[0]) < 0.05
        assert abs(row["radius"] - full.radii[0]) < 0.05 and abs(row["thickness"] - full["thickness"][0]) < 0.05
    for bad in (0.5, float("nan"), "two"):
        with pytest.raises(ValueError, match="radius_step_factor"):
            refine.fit_sphere_at(tomo, centers[0], VOXEL, radius_step_factor=bad)


def test_add_at_without_membrane_raises_and_changes_nothing(scene, tmp_path):
    tomo, centers, radii, base = scene
    ed = editor(scene, log_path=tmp_path / "log.jsonl")
    empty = np.array([5.0, 5.0, 120.0])          # a corner without vesicles
    assert np.min(np.linalg.norm(centers - empty, axis=1) - radii) > 6
    with pytest.raises(NoMembraneFound, match="radius=") as info:
        ed.add_at(empty)
    assert info.value.suggested_radius == pytest.approx(np.median(radii[:N_BASE]))
    assert isinstance(info.value, ValueError)
    assert not ed.can_undo and same_table(ed.table, base)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1   # header only
    # the offered fallback: a plain sphere of the chosen radius
    vid = ed.add_at(empty, radius=info.value.suggested_radius)
    row = ed.row(vid)
    assert (row["z"], row["y"], row["x"], row["radius"]) == (5.0, 5.0, 120.0, info.value.suggested_radius)
    assert ed.id_at(empty) == vid
    with pytest.raises(ValueError, match="outside the tomogram"):
        ed.add_at((-3, 10, 10))
    with pytest.raises(ValueError, match="positive"):
        ed.add_sphere((10, 10, 10), -2)
    with pytest.raises(ValueError, match="max_diameter_nm"):
        ed.add_sphere((10, 10, 10), 2 * 50.0 / VOXEL + 1)     # a runaway radius, not a vesicle
    with pytest.raises(ValueError, match="max_diameter_nm"):
        ed.resize(vid, 1000)
    assert ed.n_edits == 1


def test_remove_keeps_row_and_undo_brings_it_back(scene):
    tomo, centers, radii, base = scene
    ed = editor(scene)
    lab0 = ed.labels.copy()
    ed.remove(3)
    t = ed.table
    assert len(t) == len(base) and list(t.ids) == list(base.ids)
    row = ed.row(3)
    assert row["status"] == "removed" and row["stage"] == "editor" and row["note"] == "removed in editor"
    assert not (ed.labels == 3).any() and ed.id_at(centers[2]) is None
    ed.remove([3])                    # already removed: not an edit
    assert ed.n_edits == 1
    with pytest.raises(KeyError, match="99"):
        ed.remove([4, 99])
    assert ed.row(4)["status"] == "accepted"    # nothing changed by the failed call
    ev = ed.undo()
    assert ev.kind == "undo" and ev.action == "remove" and ev.ids == (3,)
    assert np.array_equal(ed.labels, lab0) and same_table(ed.table, base)
    assert ed.redo().action == "remove" and ed.row(3)["status"] == "removed"
    ed.undo()
    assert ed.undo() is None


def test_painting_rule_and_erasing_restores_neighbour(scene):
    tomo = scene[0]
    base = VesicleTable.from_arrays([[30, 60, 50]], [10.0], voxel_size=VOXEL)
    ed = VesicleEditor(tomo, base, VOXEL)
    lab0 = ed.labels.copy()
    n1 = int((lab0 == 1).sum())
    vid = ed.add_sphere((30, 60, 62), 8.0)      # overlaps sphere 1 by 6 voxels along x
    row = ed.labels[30, 60]
    # the overlap is split by relative depth: sphere 1 keeps the voxels nearer its own centre
    assert row[56] == 1 and row[57] == vid and row[70] == vid and row[71] == 0   # plane at x = 56.7
    assert 0 < int((ed.labels == 1).sum()) < n1
    assert np.array_equal(ed.labels, render_labels(ed.table, SHAPE))
    ed.remove(vid)                              # erasing gives sphere 1 its voxels back, exactly
    assert np.array_equal(ed.labels, lab0)
    ed.undo()
    ed.undo()
    assert np.array_equal(ed.labels, lab0) and same_table(ed.table, base)


def test_remove_in_box(scene):
    tomo, centers, radii, base = scene
    ed = editor(scene)
    lo, hi = np.array([0, 0, 0]), np.array([40, 70, 70])
    inside = [int(i) for i, c in zip(base.ids, centers[:N_BASE]) if np.all((c >= lo) & (c <= hi))]
    assert 2 <= len(inside) < N_BASE
    assert ed.remove_in_box(hi, lo) == inside       # corners in any order
    assert ed.n_edits == 1 and all(ed.row(i)["status"] == "removed" for i in inside)
    assert ed.remove_in_box(lo, hi) == []
    ed.undo()
    assert same_table(ed.table, base)


def test_move_resize_refit_and_review(scene, tmp_path):
    tomo, centers, radii, base = scene
    ed = editor(scene, autosave_path=tmp_path / "auto.csv")
    ed.move(5, centers[4] + [2.5, -2.0, 1.5])
    ed.resize(5, radii[4] * 1.25)
    row = ed.row(5)
    assert row["radius"] == radii[4] * 1.25 and row["z"] == centers[4][0] + 2.5 and row["stage"] == "editor"
    assert np.array_equal(ed.labels, render_labels(ed.table, SHAPE))
    ed.refit(5)                                  # back onto the membrane
    row = ed.row(5)
    assert np.linalg.norm(np.array([row["z"], row["y"], row["x"]]) - centers[4]) < 1.0
    assert abs(row["radius"] - radii[4]) < 1.0 and row["note"].startswith("refit")
    # reviewing: rejected -> removed, accepted -> back, None clears the mark only
    ed.set_reviewed(7, "rejected")
    assert ed.row(7)["status"] == "removed" and ed.row(7)["reviewed"] == "rejected"
    assert not (ed.labels == 7).any()
    ed.set_reviewed(7, "accepted")
    assert ed.row(7)["status"] == "accepted" and (ed.labels == 7).any()
    ed.set_reviewed(7, None)
    assert ed.row(7)["reviewed"] == "" and ed.row(7)["status"] == "accepted"
    with pytest.raises(ValueError, match="verdict"):
        ed.set_reviewed(7, "maybe")
    ed.set_reviewed(8, "accepted")
    # the autosaved CSV is the current table, reviewed column included
    ed.flush_autosave(timeout=30)
    saved = read_vesicles_csv(tmp_path / "auto.csv")
    assert same_table(saved, ed.table) and saved.row(8)["reviewed"] == "accepted"
    with pytest.raises(KeyError):
        ed.move(999, (10, 10, 10))
    with pytest.raises(ValueError, match="outside"):
        ed.move(5, (10, 10, 500))


def test_refit_without_membrane_raises(scene):
    tomo, centers, radii, base = scene
    ed = editor(scene)
    vid = ed.add_sphere((5.0, 5.0, 120.0), 8.0)
    with pytest.raises(NoMembraneFound, match=f"vesicle {vid}"):
        ed.refit(vid)
    assert ed.n_edits == 1 and ed.row(vid)["radius"] == 8.0


def test_inputs_not_modified(scene, tmp_path):
    tomo, centers, radii, base = scene
    before = base.copy()
    path = tmp_path / "tomo.f32"
    tomo.tofile(path)
    digest = path.read_bytes()
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=tomo.shape)   # a memory-mapped tomogram
    ed = VesicleEditor(mm, base, VOXEL)
    ed.remove(1)
    vid = ed.add_at(centers[N_BASE])
    ed.refit(vid)
    ed.set_reviewed(2, "rejected")
    assert same_table(base, before)
    del mm
    assert path.read_bytes() == digest


# ---------------------------------------------------------------------------------------------
# review queue
# ---------------------------------------------------------------------------------------------
def test_review_queue_order_and_progress(scene):
    tomo = scene[0]
    t = VesicleTable.from_arrays(
        [[30, 30, 30], [30, 30, 60], [30, 90, 30], [30, 90, 46], [3, 60, 100], [30, 100, 100], [40, 50, 80],
         [50, 20, 100]],
        [6, 6, 6, 12, 6, 6, 6, 6], voxel_size=VOXEL,
        pvalue=[0.5, 0.01, 0.3, 0.6, 0.4, np.nan, 0.002, 0.2],
        status=["accepted"] * 6 + ["removed", "removed"], stage=["outliers"] * 8)
    ed = VesicleEditor(tomo, t, VOXEL)
    ed.remove(1)        # a user removal is not a candidate to review
    ed.add_sphere((55, 60, 60), 5)  # id 9: no p-value
    # low p (2), edge-touching (5: z - r < 0), overlapping pair (3, 4: 16 apart, radii 6 + 12),
    # pipeline-removed most plausible first (8, 7), then the rest by p-value (none last: 6, 9 by id)
    assert ed.review_queue() == [2, 5, 3, 4, 8, 7, 6, 9]
    assert ed.review_progress == "0 / 8 reviewed"
    ed.set_reviewed(3, "rejected")
    ed.set_reviewed(7, "accepted")
    assert ed.n_reviewed == 2 and ed.review_progress == "2 / 8 reviewed"
    # 3 rejected: 4 overlaps nothing any more and joins the accepted bulk, after the removed 8
    assert ed.review_queue(unreviewed_only=True) == [2, 5, 8, 4, 6, 9]


def test_review_queue_follows_every_edit_undo_and_redo(scene):
    """The queue (kept between calls while nothing changes) is always the one of the current table."""
    tomo, centers, _, _ = scene
    ed = editor(scene)

    def check():
        fresh = VesicleEditor(tomo, ed.table, VOXEL, labels=ed.labels)
        assert ed.review_queue() == fresh.review_queue()
        assert ed.review_queue(unreviewed_only=True) == fresh.review_queue(unreviewed_only=True)
        assert ed.review_progress == fresh.review_progress

    check()
    first = ed.review_queue()[0]
    ed.remove(first)                         # leaves the queue
    assert first not in ed.review_queue()
    check()
    ed.set_reviewed(ed.review_queue()[0], "accepted")
    check()
    c = ed.row(3)
    ed.move(3, (c["z"], c["y"], 0.0))        # now touches the edge: moves up the queue
    check()
    ed.add_sphere((c["z"], c["y"], 6.0), 5.0)  # overlaps vesicle 3
    check()
    for _ in range(3):
        ed.undo()
        check()
    ed.redo()
    check()


# ---------------------------------------------------------------------------------------------
# property test: 200 random edits, undo all, redo all
# ---------------------------------------------------------------------------------------------
def _random_edits(ed: VesicleEditor, centers, rng, n_edits: int) -> None:
    missed = list(range(N_BASE, len(centers)))
    while ed.n_edits < n_edits:
        t = ed.table
        ids = [int(i) for i in t.ids]
        op = rng.choice(["add_at", "add_sphere", "remove", "move", "resize", "refit", "review", "box"],
                        p=[0.08, 0.17, 0.15, 0.15, 0.15, 0.05, 0.2, 0.05])
        vid = int(rng.choice(ids)) if ids else None
        try:
            if op == "add_at":
                if missed and rng.random() < 0.6:
                    ed.add_at(centers[missed.pop()] + rng.uniform(-1.5, 1.5, 3))
                else:
                    ed.add_at(rng.uniform(0, np.array(SHAPE) - 1))
            elif op == "add_sphere":
                ed.add_sphere(rng.uniform(0, np.array(SHAPE) - 1), rng.uniform(3, 14))
            elif op == "remove":
                ed.remove(vid if rng.random() < 0.7 else rng.choice(ids, 3).tolist())
            elif op == "move":
                r = ed.row(vid)
                c = np.array([r["z"], r["y"], r["x"]]) + rng.normal(0, 3, 3)
                ed.move(vid, np.clip(c, 0, np.array(SHAPE) - 1))
            elif op == "resize":
                ed.resize(vid, rng.uniform(3, 14))
            elif op == "refit":
                ed.refit(vid)
            elif op == "review":
                ed.set_reviewed(vid, rng.choice(["accepted", "rejected", None]))
            else:
                lo = rng.uniform(0, np.array(SHAPE) - 1)
                ed.remove_in_box(lo, lo + rng.uniform(5, 40, 3))
        except (NoMembraneFound, DuplicateVesicle):
            pass


def test_random_edits_undo_all_redo_all_bit_for_bit(scene):
    tomo, centers, radii, base = scene
    ed = editor(scene)
    t0, lab0 = ed.table, ed.labels.copy()
    _random_edits(ed, centers, np.random.default_rng(2024), 200)
    assert ed.n_edits == 200
    t1, lab1 = ed.table, ed.labels.copy()
    assert np.array_equal(lab1, render_labels(t1, SHAPE))     # labels always follow the table
    assert len(t1) > len(t0) and not same_table(t1, t0)
    assert set(t0.ids) <= set(t1.ids)                          # nothing renumbered or lost
    # memory-bounded history: far below even one label volume per edit
    assert ed.history_nbytes < 200 * lab0.nbytes / 20
    while ed.can_undo:
        ed.undo()
    assert same_table(ed.table, t0) and np.array_equal(ed.labels, lab0)
    while ed.can_redo:
        ed.redo()
    assert same_table(ed.table, t1) and np.array_equal(ed.labels, lab1)
    # a new edit after undo clears the redo history
    ed.undo()
    ed.add_sphere((30, 30, 30), 4)
    assert not ed.can_redo


# ---------------------------------------------------------------------------------------------
# edit log, autosave, restore
# ---------------------------------------------------------------------------------------------
def test_log_and_restore_same_state(scene, tmp_path):
    tomo, centers, radii, base = scene
    log = tmp_path / "edits.jsonl"
    ed = editor(scene, log_path=log, autosave_path=tmp_path / "vesicles.csv")
    _random_edits(ed, centers, np.random.default_rng(7), 40)
    for _ in range(5):
        ed.undo()
    ed.redo()
    lines = log.read_text().splitlines()
    assert json.loads(lines[0])["format"] == "cryoves-edit-log" and len(lines) == 1 + 40 + 6
    assert [json.loads(x)["op"] for x in lines[-6:]] == ["undo"] * 5 + ["redo"]
    t1, lab1 = ed.table, ed.labels.copy()
    ed.close()
    info = edit_log_info(log)
    assert (info.n_operations, info.n_edits, info.shape, info.base_rows, info.torn_tail) == \
        (46, ed.n_edits, SHAPE, N_BASE, False)
    assert ed.n_edits == 36
    with pytest.raises(FileExistsError, match="restore"):
        editor(scene, log_path=log)
    back = VesicleEditor.restore(tomo, VOXEL, log, base, autosave_path=tmp_path / "vesicles.csv")
    assert same_table(back.table, t1) and np.array_equal(back.labels, lab1)
    assert back.n_edits == ed.n_edits and back.can_redo == ed.can_redo
    # the restored undo history is the same: undo all gives the base
    while back.can_undo:
        back.undo()
    assert same_table(back.table, base)
    # ... and these undos were appended to the same log
    again = VesicleEditor.restore(tomo, VOXEL, log, base)
    assert same_table(again.table, base) and again.n_edits == 0 and again.can_redo
    # the base table may come back from its CSV file, where a NaN is a NaN whatever its bits
    from cryoves.io import write_vesicles_csv
    from_csv = read_vesicles_csv(write_vesicles_csv(tmp_path / "base.csv", base))
    assert same_table(VesicleEditor.restore(tomo, VOXEL, log, from_csv).table, base)
    neg_nan = base.copy()
    neg_nan["thickness"] = -neg_nan["thickness"]          # -nan: a NaN with the sign bit set
    assert neg_nan["thickness"].tobytes() != base["thickness"].tobytes()
    assert VesicleEditor.restore(tomo, VOXEL, log, neg_nan).table == base
    # a different base table is refused
    other = base.copy()
    other["radius"] = other.radii + 0.5
    with pytest.raises(ValueError, match="different base table"):
        VesicleEditor.restore(tomo, VOXEL, log, other)


def test_restore_drops_a_torn_last_line(scene, tmp_path):
    tomo, centers, radii, base = scene
    log = tmp_path / "edits.jsonl"
    ed = editor(scene, log_path=log)
    ed.remove(2)
    ed.add_sphere((30, 30, 30), 6)
    state = ed.table
    ed.close()
    with open(log, "a") as fh:
        fh.write('{"seq":3,"op":"edit","kind":"remove","bef')      # killed in the middle of a write
    assert edit_log_info(log).torn_tail and edit_log_info(log).n_edits == 2
    back = VesicleEditor.restore(tomo, VOXEL, log, base)
    assert same_table(back.table, state) and not edit_log_info(log).torn_tail
    back.resize(2, 9.0)                                  # appends after the last complete line
    back.close()
    again = VesicleEditor.restore(tomo, VOXEL, log, base)
    assert again.n_edits == 3 and again.row(2)["radius"] == 9.0
    (tmp_path / "junk.jsonl").write_text("hello\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        VesicleEditor.restore(tomo, VOXEL, tmp_path / "junk.jsonl", base)
    with pytest.raises(ValueError, match="not a cryoves edit log"):
        (tmp_path / "other.jsonl").write_text('{"a": 1}\n')
        edit_log_info(tmp_path / "other.jsonl")
    lines = log.read_text().splitlines()
    (tmp_path / "bad.jsonl").write_text(lines[0] + '\n{"seq":1,"op":"edit","kind":"remove"}\n')
    with pytest.raises(ValueError, match="line 2: malformed"):
        VesicleEditor.restore(tomo, VOXEL, tmp_path / "bad.jsonl", base)


_CHILD = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path[:0] = [{tests!r}, {src!r}]
    from test_edit import scene_arrays, scripted_edit
    from cryoves.edit import VesicleEditor
    tomo, base = scene_arrays()
    ed = VesicleEditor(tomo, base, {voxel}, log_path={log!r}, autosave_path={csv!r})
    print("ready", flush=True)
    for k in range(100000):
        scripted_edit(ed, k)
        time.sleep(0.005)
""")


def scene_arrays():
    centers, radii = random_vesicles(SHAPE, 30, r_range=(7, 11), seed=0)
    tomo = draw_vesicles(SHAPE, centers, radii, thickness=2.0, noise=1.0, seed=5)
    base = VesicleTable.from_arrays(centers[:N_BASE], radii[:N_BASE], voxel_size=VOXEL, stage="refine")
    return tomo, base


def scripted_edit(ed: VesicleEditor, k: int) -> None:
    """Edit number k of a deterministic editing session (cheap edits, undo/redo included)."""
    rng = np.random.default_rng(k)
    ids = [int(i) for i in ed.table.ids]
    vid = int(rng.choice(ids))
    op = k % 7
    if op == 0:
        ed.add_sphere(rng.uniform(0, np.array(SHAPE) - 1), rng.uniform(3, 12))
    elif op == 1:
        ed.remove(vid)
    elif op == 2:
        ed.move(vid, rng.uniform(0, np.array(SHAPE) - 1))
    elif op == 3:
        ed.resize(vid, rng.uniform(3, 12))
    elif op == 4:
        ed.set_reviewed(vid, ["accepted", "rejected", None][k % 3])
    elif op == 5:
        ed.undo()
    else:
        ed.redo() if ed.can_redo else ed.add_sphere(rng.uniform(0, np.array(SHAPE) - 1), 5.0)


def test_sigkill_while_editing_restores_every_logged_edit(tmp_path):
    log, csv = tmp_path / "edits.jsonl", tmp_path / "vesicles.csv"
    here = Path(__file__).parent
    code = _CHILD.format(tests=str(here), src=str(here.parent / "src"), voxel=VOXEL, log=str(log), csv=str(csv))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()[-2000:]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            # mid-editing, after an autosave (due at most 3 s after the first unsaved edit)
            if csv.exists() and log.read_text().count("\n") > 60:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)           # no chance to clean up
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    n_logged = len(log.read_bytes().split(b"\n")[1:-1])   # complete lines after the header
    assert n_logged >= 60
    tomo, base = scene_arrays()
    back = VesicleEditor.restore(tomo, VOXEL, log, base)
    # the same session replayed here, as far as it was logged (one log line per edit, undo, redo)
    ref_log = tmp_path / "ref.jsonl"
    ref = VesicleEditor(tomo, base, VOXEL, log_path=ref_log)
    states = [ref.table]
    k = 0
    while ref_log.read_text().count("\n") - 1 < n_logged:
        n = ref_log.read_text().count("\n")
        scripted_edit(ref, k)
        k += 1
        if ref_log.read_text().count("\n") > n:
            states.append(ref.table)
    assert ref_log.read_text().splitlines()[1:] == log.read_text().splitlines()[1:n_logged + 1]
    assert same_table(back.table, ref.table) and back.n_edits == ref.n_edits
    assert np.array_equal(back.labels, ref.labels)
    # the autosaved table (written in the background) is a complete CSV of one of the logged states
    saved = read_vesicles_csv(csv)
    assert any(same_table(saved, s) for s in states[::-1])


def test_autosave_follows_edits_without_flush(scene, tmp_path):
    csv = tmp_path / "auto.csv"
    ed = editor(scene, autosave_path=csv)
    ed.remove(4)
    ed.set_reviewed(5, "accepted")
    deadline = time.monotonic() + 20
    while not csv.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert same_table(read_vesicles_csv(csv), ed.table)    # the latest table, once edits pause
    ed.resize(6, 5.5)
    ed.close()                                              # close() writes what is pending
    assert read_vesicles_csv(csv).row(6)["radius"] == 5.5
    for call in (lambda: ed.remove(7), lambda: ed.add_sphere((30, 30, 30), 5), ed.undo, ed.redo):
        with pytest.raises(RuntimeError, match="closed"):      # an edit that would be neither logged nor saved
            call()
    assert ed.row(7)["status"] == "accepted" and ed.n_edits == 3
    ed.close()
    with pytest.raises(ValueError, match="needs a path"):
        editor(scene).save()
    assert ed.save(tmp_path / "copy.csv") == tmp_path / "copy.csv"
    assert same_table(read_vesicles_csv(tmp_path / "copy.csv"), ed.table)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a device that is always full)")
def test_edit_not_made_when_the_log_cannot_be_written(scene, tmp_path):
    with pytest.raises(OSError, match="edit log"):
        editor(scene, log_path="/dev/full")
    ed = editor(scene, log_path=tmp_path / "edits.jsonl")
    ed.remove(1)
    t, lab = ed.table, ed.labels.copy()
    ed._log = open("/dev/full", "ab")        # the disk fills up
    for call in (lambda: ed.remove(2), lambda: ed.add_sphere((30, 30, 30), 5), ed.undo):
        with pytest.raises(OSError, match="the edit was not made"):
            call()
        assert same_table(ed.table, t) and np.array_equal(ed.labels, lab) and ed.n_edits == 1


def test_log_lines_are_flushed_at_once_and_fsynced_off_the_editing_thread(scene, tmp_path, monkeypatch):
    """An edit returns once its line is in the operating system (it survives the process being
    killed); the fsync to the disk (milliseconds) is done by a background thread, and a failed one stops
    the next edit rather than going unnoticed."""
    import errno
    import threading

    real = os.fsync
    calls = []
    fail = []

    def fsync(fd):
        calls.append(threading.current_thread() is threading.main_thread())
        if fail:
            raise OSError(errno.EIO, "I/O error")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log = tmp_path / "edits.jsonl"
    ed = editor(scene, log_path=log)
    ed.remove(3)
    assert log.read_bytes().count(b"\n") == 2          # header + the edit, readable at once
    assert json.loads(log.read_bytes().splitlines()[1])["kind"] == "remove"
    deadline = time.monotonic() + 10
    while len(calls) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls and not any(calls)                     # synced, and not by the editing thread
    fail.append(True)
    ed.remove(4)                                        # flushed; its fsync fails in the background
    deadline = time.monotonic() + 10
    while ed._syncer._error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="edit log .* the edit was not made"):
        ed.remove(5)
    assert ed.row(5)["status"] == "accepted" and ed.n_edits == 2
    fail.clear()
    ed.undo()
    ed.close()                                          # the last line synced before close returns
    assert calls[-1] is True and log.read_bytes().count(b"\n") == 4


def test_reading_gives_the_table_itself_under_the_lock(scene):
    import threading

    ed = editor(scene)
    done = threading.Event()
    with ed.reading() as t:
        assert same_table(t, ed.table) and t is not ed.table  # the table itself; .table is a copy
        worker = threading.Thread(target=lambda: (ed.remove(2), done.set()))
        worker.start()
        assert not done.wait(0.3)            # an edit from another thread waits for the block
        assert t.row(2)["status"] == "accepted"
    worker.join(10)
    assert done.is_set() and ed.row(2)["status"] == "removed"


@pytest.mark.parametrize("note", ["", 'a note, with "quotes"\nand a line break'])
def test_autosave_text_is_the_whole_tables_after_random_edits(scene, tmp_path, note):
    """The autosave formats again only the rows of the vesicles changed since its last write; the
    file is still, byte for byte, cryoves.io's CSV of the whole current table, through edits,
    undo and redo, adds and their undo (rows appended and dropped), with or without notes that
    the CSV must quote over several lines."""
    from cryoves.io import vesicles_csv_text

    tomo, centers, radii, base = scene
    base = base.copy()
    base["note"] = np.array([note if k % 3 == 0 else "" for k in range(len(base))], dtype=object)
    csv = tmp_path / "auto.csv"
    ed = VesicleEditor(tomo, base, VOXEL, autosave_path=csv)
    rng = np.random.default_rng(7)
    for n in range(6, 61, 6):
        _random_edits(ed, centers, rng, n)
        for _ in range(int(rng.integers(0, 4))):
            ed.undo()
        for _ in range(int(rng.integers(0, 3))):
            ed.redo()
        ed.flush_autosave(timeout=30)
        assert csv.read_text(encoding="utf-8") == vesicles_csv_text(ed.table)
    while ed.can_undo:
        ed.undo()
    ed.flush_autosave(timeout=30)
    assert csv.read_text(encoding="utf-8") == vesicles_csv_text(ed.table)
    assert same_table(read_vesicles_csv(csv), ed.table)
    ed.close()
