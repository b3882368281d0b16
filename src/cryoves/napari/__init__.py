"""The cryoves napari plugin (npe2 manifest: ``napari.yaml``).

Modules: ``_reader`` (MRC files), ``_writer`` (labels/images to MRC, vesicle table to CSV, STAR,
IMOD), ``_sample_data`` (File > Open Sample), ``_layers`` (layer naming and the VesicleTable <->
Points layer conversion), ``_results`` (stage results into layers, never over edits).

Dock widgets, one module each: ``_predict`` (1. Predict), ``_threshold`` (2. Threshold),
``_refine`` (3. Refine spheres), ``_outliers`` (4. Outlier filter), ``_export`` (5. Export),
``_pipeline`` (Find vesicles, all stages). Their parts: ``_base`` (the common frame, layer
pickers, input checks), ``_weights_panel`` (weights and voxel size, used by Predict and Find
vesicles), ``_params`` (the shared parameter fields), ``_plots`` (matplotlib plots), ``_runner``
(worker threads, progress, cancel, error messages) and ``_service`` (the one thread that runs
every TensorFlow call, the model cache). See ``docs/napari.md``.
Importing this package loads neither Qt nor TensorFlow.
"""
