"""The cryoves napari plugin (npe2 manifest: ``napari.yaml``).

Modules: ``_reader`` (MRC files), ``_writer`` (labels/images to MRC, vesicle table to CSV, STAR,
IMOD), ``_sample_data`` (File > Open Sample), ``_widgets`` (the dock widgets), ``_layers`` (layer
naming and the VesicleTable <-> Points layer conversion), ``_params`` (the shared parameter
fields), ``_runner`` (worker threads, progress, cancel, error messages). See ``docs/napari.md``.
Importing this package loads neither Qt nor TensorFlow.
"""
