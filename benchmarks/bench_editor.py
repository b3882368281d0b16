"""Benchmark of the napari vesicle editor: real clicks and keys on a full-size tomogram.

Run from the repository root (needs a display; Xvfb is fine)::

    xvfb-run -a python benchmarks/bench_editor.py                        # 300 x 1000 x 1000, 1000 vesicles
    xvfb-run -a python benchmarks/bench_editor.py --shape 100 500 500 --n 250 --reps 10   # quicker

The tomogram is the float32 memory map of ``benchmarks/bench_editor_core.py`` (a tiled block of
synthetic vesicles), shown in a napari viewer with its vesicles layer (``--n`` vesicles) and the
"6. Edit vesicles" dock widget editing it (edit log and autosave in a temporary folder). The view is
centred on each target at ~3 screen pixels per voxel (as when proofreading), the mouse is moved
onto the target (untimed: as a hand does before it clicks; napari updates its status bar then)
and rests there ``--dwell`` seconds (default 0.3), then one Qt mouse press and release is sent to
the canvas; Ctrl+Z / Ctrl+Shift+Z are typed in a row (``--key-dwell`` seconds apart, default 0).
The rest matters with software OpenGL: after a pause the first frames are slower (docs/speed.md).
(Before 2026-12-01 the rest was 0.3 s for ~60 % of the clicks and ~0 for the others: the wait for
the status bar's frame missed a frame already drawn.) Two times per event:

* ``handled``: from the press until the event is handled (napari's mouse handling, the edit
  with its log line, the labels repaint and the points update);
* ``total``: from the press until the canvas has been redrawn *and shown*: the first
  ``frameSwapped`` signal of the canvas (a ``QOpenGLWidget``) after the event was handled;
* ``CPU``: the CPU time the process used over ``total`` (every thread, Mesa's rendering threads
  included): what ``total`` would be on an idle machine if nothing ran in parallel, i.e. a
  figure that does not grow with the load of other jobs;
* contention (Linux): how long the process's threads were runnable but waiting for a CPU
  (the kernel's run-queue delay, summed over threads), the X server's CPU, and the share of the
  CPUs that other processes used during the events. With software OpenGL the frame is drawn by
  Mesa's threads; when another process (even at ``nice 19``) keeps a core busy, the kernel tends
  to run them and the main thread one after another on the other core, and ``total`` becomes
  the sum of their CPU times (~28 ms per frame here instead of ~17 ms with a free core). These
  figures say how much of a run's ``total`` that was.

for

* ``add``: a click in Add mode on a missed vesicle (sphere fit, label painting, points update);
* ``remove``: a click in Remove mode inside a vesicle;
* ``undo`` / ``redo``: Ctrl+Z / Ctrl+Shift+Z.

napari's notification toasts are switched off for the run (their fade animations draw frames of
their own). It also times one redraw of the canvas with nothing changed (``idle frame``: the floor of
``total`` set by the OpenGL renderer), before the edits at the first vesicle's view (a corner of the
volume: part of the canvas is empty) and after them at the last edit's view (the canvas all
tomogram, as during the edits), prints the main thread's CPU time (the serial part of an event:
Qt, napari, vispy and the editor, not Mesa's rendering threads, which run in parallel), and prints the canvas size in pixels, the OpenGL renderer
(under Xvfb: Mesa llvmpipe, i.e. software rendering on the CPU), the CPU count and the load
average before and after the run.
Prints p50 / p95 / max in ms.

Mesa's software renderer starts one rendering thread per CPU (``LP_NUM_THREADS`` overrides it;
``--lp-threads N`` sets it for the run, and the last line says when it was set).

``--trace`` also prints where the time of each event goes (napari's picking, the editor's
callback, the canvas paint, Qt's window events by type, the widgets painted before the frame);
``--profile add|remove|undo|redo`` prints a cProfile of that operation's events (press -> frame).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# the Qt 6 binding, as the tests use (qtpy would pick a PyQt5 installed beside it; napari deprecates it)
os.environ.setdefault("QT_API", "pyqt6")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from bench_editor_core import build  # noqa: E402


def _pct(times) -> str:
    t = np.array(times) * 1e3
    return f"p50 {np.percentile(t, 50):6.1f}  p95 {np.percentile(t, 95):6.1f}  max {t.max():6.1f}"


def _gl_renderer(native) -> str:
    try:
        from vispy.gloo import gl

        native.makeCurrent()
        return str(gl.glGetParameter(gl.GL_RENDERER))
    except Exception as exc:  # noqa: BLE001 - informative only
        return f"unknown ({exc})"


def _schedstat(path: str) -> tuple[int, int]:
    """(ns on a CPU, ns runnable but waiting for one) of one thread (``/proc/.../schedstat``)."""
    with open(path) as f:
        run, wait = f.read().split()[:2]
    return int(run), int(wait)


def _display_server_tasks() -> list[str]:
    """schedstat files of the X server started for this run (``xvfb-run``'s Xvfb: a child of our
    parent), if any: it copies every frame to its screen, work done for us outside this process."""
    ppid = str(os.getppid())
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            comm = (d / "comm").read_text().strip()
            if comm in ("Xvfb", "Xorg") and (d / "stat").read_text().rsplit(")", 1)[1].split()[1] == ppid:
                found += [str(t / "schedstat") for t in (d / "task").iterdir()]
        except (OSError, IndexError):
            continue
    return found


class _Contention:
    """How busy the machine was around one event (Linux ``/proc``; NaN elsewhere).

    ``wait``: the time this process's threads spent runnable but waiting for a CPU (the kernel's
    run-queue delay, summed over threads): ~0 when a core is free whenever one of them needs it.
    ``others``: the CPU time every other process used meanwhile (``/proc/stat``, whole machine,
    counted in clock ticks, so only meaningful summed over many events), the X server excluded.
    """

    def __init__(self):
        self.ok = os.path.exists("/proc/self/task") and os.path.exists("/proc/stat")
        self.xserver = _display_server_tasks() if self.ok else []
        self.tick = os.sysconf("SC_CLK_TCK") if self.ok else 100

    def snapshot(self):
        if not self.ok:
            return None
        run = wait = 0
        for t in Path("/proc/self/task").iterdir():
            try:
                r, w = _schedstat(str(t / "schedstat"))
            except (OSError, ValueError):
                continue  # a thread that ended meanwhile
            run += r
            wait += w
        xrun = 0
        for f in self.xserver:
            try:
                xrun += _schedstat(f)[0]
            except (OSError, ValueError):
                pass
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(v[:8]) - v[3] - v[4]) / self.tick  # all but idle and iowait; guest time is in user
        return time.perf_counter(), run * 1e-9, wait * 1e-9, xrun * 1e-9, busy

    @staticmethod
    def delta(a, b):
        """(wall, our CPU, our wait for a CPU, X server CPU, other processes' CPU) in seconds."""
        if a is None or b is None:
            return (np.nan,) * 5
        wall, run, wait, xrun, busy = (y - x for x, y in zip(a, b))
        return wall, run, wait, xrun, busy - run - xrun


def _install_trace(spans: list, widget) -> None:  # widget: the EditorWidget class
    """Wrap a few napari / vispy / Qt / editor methods to record ``(name, seconds)`` of each call
    (a call made inside another traced call is named "X < Y": it is part of Y's time too)."""
    import napari._qt.qt_main_window as qmw
    from qtpy.QtCore import QEvent
    from vispy.app.backends import _qt as vqt
    from vispy.scene.canvas import SceneCanvas

    import threading

    local = threading.local()  # one stack of open calls per thread

    def wrap(owner, attr, name):
        orig = getattr(owner, attr)

        def wrapper(*args, **kw):
            stack = local.__dict__.setdefault("stack", [])
            label = name(*args) if callable(name) else name
            if stack:
                label = f"{label} < {stack[-1].split(' < ')[0]}"
            stack.append(label)
            t = time.perf_counter()
            try:
                return orig(*args, **kw)
            finally:
                stack.pop()
                spans.append((label, time.perf_counter() - t, t))

        setattr(owner, attr, wrapper)

    def window_event(self, e):
        try:
            return f"Qt window event {QEvent.Type(e.type()).name if hasattr(QEvent.Type(e.type()), 'name') else int(e.type())}"
        except Exception:  # noqa: BLE001
            return f"Qt window event {int(e.type())}"

    from qtpy.QtCore import QObject
    from qtpy.QtWidgets import QApplication

    class _PaintSpy(QObject):
        def eventFilter(self, obj, ev):  # noqa: N802 - Qt API
            if ev.type() == QEvent.Paint:
                spans.append((f"paint {type(obj).__name__}", 0.0, time.perf_counter()))
            return False

    spy = _PaintSpy()
    app = QApplication.instance()
    if app is None:
        from napari._qt.qt_event_loop import get_qapp

        app = get_qapp()
    app.installEventFilter(spy)
    _install_trace.spy = spy  # keep it alive
    wrap(qmw._QtMainWindow, "event", window_event)
    wrap(vqt.CanvasBackendDesktop, "paintGL", "canvas paintGL")
    wrap(SceneCanvas, "visual_at", "vispy picking (visual_at)")
    wrap(qmw._QtMainWindow, "set_status_and_tooltip", "status bar update")
    import cryoves.io

    wrap(cryoves.io, "write_vesicles_csv", "autosave (in its thread)")
    ed_cls = widget
    wrap(ed_cls, "click", "editor click (edit + display)")
    wrap(ed_cls, "undo", "editor undo (edit + display)")
    wrap(ed_cls, "redo", "editor redo (edit + display)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, default=(300, 1000, 1000), metavar=("Z", "Y", "X"))
    ap.add_argument("--tile", type=int, nargs=3, default=(150, 250, 250), metavar=("Z", "Y", "X"))
    ap.add_argument("--n", type=int, default=1000, help="vesicles in the edited table (default 1000)")
    ap.add_argument("--reps", type=int, default=30, help="timed clicks / keys per operation (default 30)")
    ap.add_argument("--voxel-size", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, nargs=2, default=(1400, 950), metavar=("W", "H"),
                    help="size of the napari window (default 1400 950; the canvas is what the layer list "
                         "and the editor dock leave of it, and what the screen allows)")
    ap.add_argument("--profile", choices=("add", "remove", "undo", "redo"), default=None,
                    help="print the top functions (cProfile) of this operation's timed events (press -> frame shown)")
    ap.add_argument("--profile-out", default=None, help="also save the cProfile statistics to this file")
    ap.add_argument("--profile-sort", default="cumulative", help="cProfile sort key (default cumulative)")
    ap.add_argument("--trace", action="store_true",
                    help="also print where the time of each event goes (mean ms per event: napari's picking, "
                         "the editor's callback, the canvas paint, Qt's window events by type)")
    ap.add_argument("--tmp", default=None, help="folder for the memmap, log and autosave (default: system temp)")
    ap.add_argument("--dwell", type=float, default=0.3, metavar="S",
                    help="seconds the mouse rests on the target before each click, as a hand does (default 0.3)")
    ap.add_argument("--key-dwell", type=float, default=0.0, metavar="S",
                    help="seconds of nothing before each Ctrl+Z / Ctrl+Shift+Z (default 0: typed in a row)")
    ap.add_argument("--lp-threads", type=int, default=None, metavar="N",
                    help="rendering threads of Mesa's software OpenGL (sets LP_NUM_THREADS before the viewer is "
                         "made; default: Mesa's, one per CPU). 2 x the CPUs avoids the slow first frames after "
                         "a pause (docs/speed.md)")
    a = ap.parse_args(argv)
    if a.dwell < 0 or a.key_dwell < 0:
        raise SystemExit(f"--dwell and --key-dwell must be >= 0, got {a.dwell} and {a.key_dwell}")
    if a.lp_threads is not None:
        if a.lp_threads < 1:
            raise SystemExit(f"--lp-threads must be >= 1, got {a.lp_threads}")
        os.environ["LP_NUM_THREADS"] = str(a.lp_threads)  # read by Mesa when the first OpenGL context is made

    import napari
    from qtpy.QtCore import QPoint, Qt
    from qtpy.QtTest import QTest
    from qtpy.QtWidgets import QApplication

    from cryoves.napari._editor import EditorWidget
    from cryoves.napari._layers import image_kwargs, points_layer_data, set_thick_slicing

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(dir=a.tmp, prefix="cryoves-bench-editor-ui-") as d:
        d = Path(d)
        t0 = time.perf_counter()
        per_tile_missed = max(2, int(np.ceil(a.reps / np.prod(np.ceil(np.array(a.shape) / a.tile)))) + 1)
        tomo, table, missed = build(d, a.shape, a.tile, a.n, per_tile_missed, a.voxel_size, a.seed)
        print(f"tomogram {tomo.shape} float32 memmap ({tomo.nbytes / 2**30:.2f} GiB), {len(table)} vesicles, "
              f"{len(missed)} missed; made in {time.perf_counter() - t0:.1f} s")

        from napari.settings import get_settings

        # no notification toasts: their fade animations would draw frames of their own while timing
        get_settings().application.gui_notification_level = "none"
        spans: list[tuple[str, float]] = []
        if a.trace:
            _install_trace(spans, EditorWidget)
        viewer = napari.Viewer(show=True)
        viewer.window._qt_window.resize(*a.window)
        app = QApplication.instance()
        name = "bench"
        img = viewer.add_image(tomo, **image_kwargs(a.voxel_size, name, contrast_limits=(-3.0, 3.0)))
        data, kw, _ = points_layer_data(table, name, tomo.shape)
        pts = viewer.add_points(data, **kw)
        set_thick_slicing(viewer, pts)
        w = EditorWidget(viewer)
        viewer.window.add_dock_widget(w, name="6. Edit vesicles (cryoves)")
        w.folder.value = str(d / "edits")
        t0 = time.perf_counter()
        w.start()
        if w.editor is None:
            raise SystemExit(f"the editor did not start: {w.status.value}")
        print(f"Start editing (labels rendered, layers attached): {time.perf_counter() - t0:.1f} s")
        canvas = viewer.window._qt_viewer.canvas
        native = canvas.native
        cam = viewer.scene.camera
        swaps: list[float] = []
        contention = _Contention()
        native.frameSwapped.connect(lambda: swaps.append(time.perf_counter()))

        def settle():
            for _ in range(3):
                app.processEvents()

        def wait_for_frame(after: float, timeout: float = 5.0, fail: bool = True) -> float:
            """Time of the first frame shown after ``after`` (processing events until then)."""
            end = after + timeout
            while time.perf_counter() < end:
                shown = [s for s in swaps if s > after]
                if shown:
                    return shown[0]
                app.processEvents()
            if fail:
                raise SystemExit(f"no frame was drawn within {timeout:g} s of an edit")
            return float("nan")

        def look_at(zyx):
            viewer.dims.set_point(0, float(zyx[0]) * a.voxel_size)
            cam.center = (float(zyx[1]) * a.voxel_size, float(zyx[2]) * a.voxel_size)
            cam.zoom = 3.0 / a.voxel_size
            settle()
            native.update()
            wait_for_frame(time.perf_counter())
            settle()

        def pos_of(zyx):
            world = np.asarray(img.data_to_world(np.asarray(zyx, float)))
            xy = canvas.view.scene.transform.map([world[2], world[1]])[:2]
            return QPoint(int(round(xy[0])), int(round(xy[1])))

        def timed(send, op=None):
            if a.profile is not None and op == a.profile:
                prof.enable()
            swaps.clear()
            spans.clear()
            s0 = contention.snapshot()
            c = time.process_time()
            m = time.thread_time()
            t = time.perf_counter()
            send()
            h = time.perf_counter()
            parts["main_handled"].append(time.thread_time() - m)
            parts["handled"].append(h - t)
            parts["labels"].append(w.last_timing.get("labels", np.nan))
            parts["points"].append(w.last_timing.get("points", np.nan))
            shown = wait_for_frame(h)
            parts["cpu"].append(time.process_time() - c)
            parts["main"].append(time.thread_time() - m)
            parts["load"].append(_Contention.delta(s0, contention.snapshot()))
            prof.disable()
            if a.trace:
                per = trace.setdefault(op, {})
                for name, dt, _ in spans:
                    per.setdefault(name, []).append(dt)
                starts = [t0 for name, _, t0 in spans if name.startswith(("Qt window event 77", "Qt window event UpdateRequest"))
                          and t0 >= h]
                if starts:  # the wait between the event handled and the composition of its frame
                    per.setdefault("(handled -> frame's UpdateRequest)", []).append(starts[0] - h)
                per.setdefault("_events", []).append(1)
            settle()
            return shown - t

        def hover(p):
            """The mouse moves onto the target before it is pressed, as a hand does (untimed)."""
            from qtpy.QtCore import QEvent, QPointF
            from qtpy.QtGui import QMouseEvent

            ev = QMouseEvent(QEvent.MouseMove, QPointF(p), QPointF(native.mapToGlobal(QPointF(p).toPoint())),
                             Qt.NoButton, Qt.NoButton, Qt.NoModifier)
            moved = time.perf_counter()
            app.sendEvent(native, ev)
            settle()
            # the frame of the status bar, if it changed (it may have been drawn in settle() already)
            wait_for_frame(moved, timeout=0.3, fail=False)
            settle()
            rest(a.dwell)

        def rest(seconds: float) -> None:
            """Nothing happens for ``seconds`` (the event loop runs, as between a user's actions)."""
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                app.processEvents()
                time.sleep(min(0.005, max(0.0, end - time.perf_counter())))

        def timed_click(zyx, op):
            look_at(zyx)
            p = pos_of(zyx)
            hover(p)
            return timed(lambda: (QTest.mousePress(native, Qt.LeftButton, Qt.NoModifier, p),
                                  QTest.mouseRelease(native, Qt.LeftButton, Qt.NoModifier, p)), op)

        def timed_key(k, mod, op):
            rest(a.key_dwell)
            return timed(lambda: QTest.keyClick(native, k, mod), op)

        import cProfile
        import pstats

        prof = cProfile.Profile()
        trace: dict[str, dict[str, list]] = {}
        rng = np.random.default_rng(a.seed + 11)
        res = {"add": [], "remove": [], "undo": [], "redo": []}
        parts = {"handled": [], "labels": [], "points": [], "cpu": [], "main": [], "main_handled": [], "load": []}
        load = {}
        handled = {}
        inner = {}
        cpu = {}
        main_cpu = {}
        ed = w.editor
        viewer.window._qt_window.activateWindow()  # the window a user types in is the active one
        settle()
        native.setFocus()
        look_at(table.centers[0])

        def idle_frames():
            """Redraws with nothing changed at the current view: wall and CPU seconds of each."""
            wall, cpu_s = [], []
            for _ in range(a.reps):
                c = time.process_time()
                t = time.perf_counter()
                native.update()
                wall.append(wait_for_frame(t) - t)
                cpu_s.append(time.process_time() - c)
                settle()
            return wall, cpu_s

        idle, idle_cpu = idle_frames()

        def keep(op):
            handled[op] = list(parts["handled"])
            cpu[op] = list(parts["cpu"])
            main_cpu[op] = (list(parts["main_handled"]), list(parts["main"]))
            load[op] = np.array(parts["load"], dtype=float).reshape(-1, 5)
            inner[op] = (np.nanpercentile(np.array(parts["labels"]) * 1e3, 50),
                         np.nanpercentile(np.array(parts["points"]) * 1e3, 50))
            for v in parts.values():
                v.clear()

        w.set_mode("add")
        n_fail = 0
        for k in rng.permutation(len(missed))[:a.reps]:
            n0 = len(ed.table)
            dt = timed_click(missed[k] + rng.uniform(-1.0, 1.0, 3), "add")
            if len(ed.table) == n0:
                n_fail += 1
                for v in parts.values():
                    v.pop()
                continue
            res["add"].append(dt)
        keep("add")
        w.set_mode("remove")
        for vid in rng.choice(table.ids, a.reps, replace=False):
            r = table.row(int(vid))
            dt = timed_click([r["z"], r["y"], r["x"]], "remove")
            assert ed.row(int(vid))["status"] == "removed", w.status.value
            res["remove"].append(dt)
        keep("remove")
        for _ in range(a.reps):
            res["undo"].append(timed_key(Qt.Key_Z, Qt.ControlModifier, "undo"))
        keep("undo")
        for _ in range(a.reps):
            res["redo"].append(timed_key(Qt.Key_Z, Qt.ControlModifier | Qt.ShiftModifier, "redo"))
        keep("redo")
        idle_end, idle_end_cpu = idle_frames()  # at the view of the last edit: the canvas is all tomogram
        size = (native.width(), native.height())
        dpr = native.devicePixelRatioF()
        renderer = _gl_renderer(native)
        w.close_editor()
        if a.profile:
            print(f"cProfile of the {a.profile} events (press -> frame shown):")
            pstats.Stats(prof).sort_stats(a.profile_sort).print_stats(45)
            if a.profile_out:
                prof.dump_stats(a.profile_out)
        print(f"Add found a vesicle at {len(res['add'])} of {len(res['add']) + n_fail} clicks")
        print(f"{'':8}{'handled (ms)':<36}{'total, to the frame shown (ms)':<36}{'CPU of the total (ms)':<36}"
              f"labels / points p50 (ms)")
        for k, v in res.items():
            if v:
                print(f"{k:<8}{_pct(handled[k]):<36}{_pct(v):<36}{_pct(cpu[k]):<36}"
                      f"{inner[k][0]:.1f} / {inner[k][1]:.1f}")
        print("main thread's CPU (the serial part: Qt, napari, vispy, the editor; not Mesa's rendering threads):")
        for k, v in res.items():
            if v:
                print(f"{k:<8}until handled: {_pct(main_cpu[k][0])}   until the frame: {_pct(main_cpu[k][1])}")
        print("contention (the machine's other work during the events; see _Contention):")
        for k, v in res.items():
            if not v:
                continue
            ld = load[k]
            tot = np.array(v)
            calm = ld[:, 2] < 2e-3
            line = (f"{k:<8}our threads waiting for a CPU: {_pct(ld[:, 2])}; X server CPU p50 "
                    f"{np.nanpercentile(ld[:, 3] * 1e3, 50):.1f} ms; other processes' CPU: "
                    f"{np.nansum(ld[:, 4]) / np.nansum(ld[:, 0]):.2f} of {os.cpu_count()} CPUs (mean)")
            if calm.any() and not calm.all():
                line += f"; total of the {calm.sum()} events that waited < 2 ms: {_pct(tot[calm])}"
            elif calm.all():
                line += "; no event waited 2 ms"
            print(line)
        if a.trace:
            print("where the time goes, press -> frame shown (ms per event, mean; count per event):")
            for op, per in trace.items():
                n = len(per.pop("_events"))
                print(f"  {op}: " + ", ".join(f"{k} {np.sum(v) * 1e3 / n:.1f} ({len(v) / n:.1f}x)"
                                             for k, v in sorted(per.items(), key=lambda kv: -np.sum(kv[1]))))
        print(f"idle frame at the first vesicle's view (a corner: less tomogram on the canvas): {_pct(idle)} ms; "
              f"CPU {_pct(idle_cpu)} ms")
        print(f"idle frame at the last edit's view: {_pct(idle_end)} ms; CPU {_pct(idle_end_cpu)} ms")
        threads = os.environ.get("LP_NUM_THREADS")
        print(f"canvas {size[0]} x {size[1]} px (device pixel ratio {dpr:g}); OpenGL renderer: {renderer}"
              + (f"; LP_NUM_THREADS={threads}" if threads else "")
              + f"; mouse rest {a.dwell:g} s before a click, {a.key_dwell:g} s before a key")
        print(f"{os.cpu_count()} CPUs visible, load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after; "
              f"napari {napari.__version__}")
        viewer.close()


if __name__ == "__main__":
    main()
