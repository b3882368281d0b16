"""5. Export: write the vesicles of a Points layer as labels, table, STAR, IMOD model, Pyto labels.

:func:`export_vesicles` is the one place where the plugin writes result files.
"""

from __future__ import annotations

from pathlib import Path

from magicgui.widgets import FileEdit, LineEdit

from cryoves.napari._base import StageWidget, optional_checkbox
from cryoves.napari._layers import SHAPE_KEY, base_name, table_from_points

__all__ = ["ExportWidget", "export_vesicles"]


class ExportWidget(StageWidget):
    """Stage 5: write the vesicles: labels (MRC), table (CSV, STAR), IMOD model, Pyto labels.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
    """

    display_name = "5. Export"
    run_text = "Export"

    def build(self):
        self.vesicles = self.layer_combo("Vesicles", "Points", "The vesicles to export",
                                         roles=("vesicles",), exclude_roles=("truth_vesicles",))
        self.folder = FileEdit(mode="d", value=str(Path.home()), label="Folder",
                               tooltip="Output folder (created if missing)")
        self.basename = LineEdit(value="", label="File name",
                                 tooltip="Start of every file name (default: the tomogram's name)")
        self.do_labels = optional_checkbox("Vesicle labels (.mrc)", True,
                                           "uint16 label volume, one id per vesicle, voxel size in the header")
        self.do_csv = optional_checkbox("Vesicle table (.csv)", True, "Every vesicle with voxel and nm columns")
        self.do_star = optional_checkbox("STAR file (.star)", False, "RELION-style coordinates (Å) for "
                                         "subtomogram averaging")
        self.do_mod = optional_checkbox("IMOD model (.mod)", False, "One sphere per vesicle, for 3dmod")
        self.do_pyto = optional_checkbox("Pyto labels (.mrc)", False,
                                         "Vesicles numbered from 10 upward, as Pyto expects")
        self.overwrite = optional_checkbox("Overwrite existing files", False,
                                           "Replace files of the same name in the folder")
        self.main.extend([self.vesicles, self.folder, self.basename, self.do_labels, self.do_csv,
                          self.do_star, self.do_mod, self.do_pyto, self.overwrite])

    def missing_hint(self, what):
        return "run Refine (or the full pipeline) first"

    def run(self):
        pts = self.require(self.vesicles, "vesicles")
        table = table_from_points(pts)
        shape = pts.metadata.get(SHAPE_KEY)
        if shape is None:
            tname = base_name(pts)
            if tname in self.viewer.layers:
                shape = self.viewer.layers[tname].data.shape
        folder = Path(str(self.folder.value)).expanduser()
        base = self.basename.value.strip() or base_name(pts).replace(" ", "_")
        todo = {k: bool(w.value) for k, w in (("labels", self.do_labels), ("csv", self.do_csv),
                                              ("star", self.do_star), ("mod", self.do_mod),
                                              ("pyto", self.do_pyto))}
        if not any(todo.values()):
            raise ValueError("nothing to export: tick at least one format")
        if (todo["labels"] or todo["pyto"] or todo["mod"]) and shape is None:
            raise ValueError("the tomogram's shape is unknown: keep its layer open to export labels")
        todo["overwrite"] = bool(self.overwrite.value)

        def work(progress):
            return export_vesicles(table, folder, base, shape, progress=progress, **todo)

        def done(paths):
            from napari.utils.notifications import show_info

            show_info("cryoves: wrote " + ", ".join(Path(p).name for p in paths) + f" in {folder}")
            return f"Wrote {len(paths)} files to {folder}"

        self.runner.start(work, done, "Export")


def export_vesicles(table, folder, base, shape, *, labels=True, csv=True, star=False, mod=False,
                    pyto=False, overwrite=False, progress=None) -> list[str]:
    """Write a vesicle table in the chosen formats as one set, with the file names of the
    command line (:func:`cryoves.export.export_results`: staged, committed together, a run
    record written last).

    Parameters
    ----------
    table : VesicleTable
    folder : path
        Output folder (created).
    base : str
        File-name stem.
    shape : (Z, Y, X) or None
        Tomogram shape (needed for label volumes and the IMOD model).
    labels, csv, star, mod, pyto : bool
        Formats to write.
    overwrite : bool
        Replace an existing complete set (otherwise it is an error and nothing is written).
    progress : callable, optional
        ``progress(stage, done, total)``.

    Returns
    -------
    list of str
        The written files (the run record last).
    """
    from cryoves.export import export_results

    formats = [k for k, v in (("csv", csv), ("labels", labels), ("pyto", pyto), ("star", star),
                              ("mod", mod)) if v]
    try:
        paths = export_results(folder, base, table, shape=None if shape is None else tuple(shape),
                               formats=formats, record={"source": "cryoves napari plugin"},
                               overwrite=overwrite, progress=progress)
    except FileExistsError as err:
        raise FileExistsError(f"{err}; tick 'Overwrite' or choose another file name") from None
    return [str(p) for p in paths.values()]
