"""``cryoves train``: train the U-Net on simulated data, or fine-tune it on your own labels."""

from __future__ import annotations

import sys
from pathlib import Path

from cryoves.cli import CliError, HelpFormatter


def add_parser(sub):
    p = sub.add_parser(
        "train",
        help="train or fine-tune the vesicle U-Net (defaults: ~75 min on 2 CPU cores)",
        description=(
            "Train the U-Net on domain-randomised simulated tomograms, or fine-tune existing weights\n"
            "(ours or the reference CryoVesNet weights.h5) on your own labelled tomograms.\n"
            "Writes OUT.weights.h5, OUT.json (model card), OUT_history.json and OUT_history.png.\n\n"
            "Run time: with the defaults (30 epochs x 100 batches of 4 patches of 48^3 voxels) about\n"
            "75 min on 2 CPU cores (1.5 s per batch measured); it grows with epochs x steps x batch size\n"
            "(patch^3). Progress goes to stderr, as plain lines when it is not a terminal (a log file)."),
        formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="output path stem, e.g. weights/my_model")
    p.add_argument("--data", action="append", default=None, metavar="TOMO.mrc:LABELS",
                   help="a labelled tomogram: LABELS is a label/mask MRC (non-zero = vesicle) or a vesicle "
                        "table CSV written by cryoves; repeat for several (default: none)")
    p.add_argument("--val-data", action="append", default=None, metavar="TOMO.mrc:LABELS",
                   help="held-out labelled tomogram(s) for validation (default: none)")
    p.add_argument("--simulated", type=int, default=0, metavar="N",
                   help="add N simulated, domain-randomised training tomograms")
    p.add_argument("--val-simulated", type=int, default=0, metavar="N",
                   help="add N simulated validation tomograms (other seeds)")
    p.add_argument("--init-weights", default=None,
                   help="start from these weights (fine-tuning); default: a new network")
    p.add_argument("--model-voxel-size", type=float, default=None,
                   help="voxel size (nm) the network works at; default: that of --init-weights, else 2.2")
    p.add_argument("--voxel-size", type=float, default=None,
                   help="override the header voxel size (nm) of every --data tomogram; default: each file's header")
    p.add_argument("--smooth-sigma", type=float, default=None, metavar="SIGMA",
                   help="Gaussian smoothing (voxels at the model's voxel size) applied before normalisation, "
                        "in training and at every prediction (recorded in the model card); default: that of "
                        "--init-weights, else none")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (run time grows linearly)")
    p.add_argument("--steps", type=int, default=100, help="batches per epoch")
    p.add_argument("--batch-size", type=int, default=4, help="patches per batch")
    p.add_argument("--patch", type=int, default=48, help="patch edge (voxels, multiple of 4)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (use ~1e-4 to fine-tune)")
    p.add_argument("--seed", type=int, default=0, help="random seed (patches, simulation, initial weights)")
    p.add_argument("--overwrite", action="store_true", help="replace existing OUT files")
    return p


def _load_pairs(specs, voxel_override, model_voxel, preprocessing):
    import numpy as np

    from cryoves import render_labels
    from cryoves.io import read_tomogram, read_vesicles_csv
    from cryoves.train import volume_pair

    out = []
    for spec in specs:
        if ":" not in spec:
            raise CliError(f"--data expects TOMO.mrc:LABELS, got {spec!r}")
        tomo_path, lab_path = spec.rsplit(":", 1)
        tomo, vs = read_tomogram(tomo_path, voxel_size=voxel_override)
        if lab_path.lower().endswith(".csv"):
            table = read_vesicles_csv(lab_path)
            labels = render_labels(table, tomo.shape, dtype=np.uint32)
        else:
            labels, _ = read_tomogram(lab_path, voxel_size=vs)
            if labels.shape != tomo.shape:
                raise CliError(f"{lab_path} has shape {labels.shape}, its tomogram {tomo.shape}")
        out.append(volume_pair(np.asarray(tomo), np.asarray(labels), vs, model_voxel, preprocessing,
                               source=Path(tomo_path).name))
    return out


def run(args) -> int:
    from cryoves.model import load_model, new_model
    from cryoves.train import TrainingParams, simulated_training_data, train_model

    out = Path(args.out)
    targets = [Path(str(out) + ".weights.h5"), Path(str(out) + ".json")]
    if not args.overwrite and any(t.exists() for t in targets):
        raise CliError(f"{targets[0]} exists; pass --overwrite to replace it")
    if not out.parent.exists():
        raise CliError(f"output folder {out.parent} does not exist")
    args.data = args.data or []
    args.val_data = args.val_data or []
    if not (args.data or args.simulated):
        raise CliError("nothing to train on: give --data TOMO.mrc:LABELS and/or --simulated N")
    try:
        params = TrainingParams(patch_size=args.patch, batch_size=args.batch_size, epochs=args.epochs,
                                steps_per_epoch=args.steps, learning_rate=args.lr, seed=args.seed)
    except ValueError as err:
        raise CliError(str(err)) from err

    if args.init_weights:
        model = load_model(args.init_weights)
        if args.model_voxel_size and abs(args.model_voxel_size - model.card.voxel_size_nm) > 1e-6:
            model.card.voxel_size_nm = args.model_voxel_size
    else:
        model = new_model(name=out.name, voxel_size_nm=args.model_voxel_size or 2.2, seed=args.seed)
    if args.smooth_sigma is not None:
        try:
            model.card = model.card.with_preprocessing(smooth_sigma=args.smooth_sigma)
        except ValueError as err:
            raise CliError(f"--smooth-sigma: {err}") from err
    mvs = model.card.voxel_size_nm
    prep = model.card.preprocessing

    from cryoves._progress import ConsoleProgress

    progress = ConsoleProgress(sys.stderr, labels={"train": "training (batches)", "simulate": "simulating",
                                                    "simulate-val": "simulating (validation)"})

    train_vols = _load_pairs(args.data, args.voxel_size, mvs, prep)
    val_vols = _load_pairs(args.val_data, args.voxel_size, mvs, prep)
    if args.simulated:
        train_vols += simulated_training_data(args.simulated, mvs, prep, seed=1000 + args.seed,
                                              progress=progress)
    if args.val_simulated:
        val_vols += simulated_training_data(args.val_simulated, mvs, prep, seed=9000 + args.seed,
                                            progress=lambda s, d, t: progress("simulate-val", d, t))
    sources = [v.source for v in train_vols]
    card_updates = {"training_data": (f"{len(train_vols)} volumes: " + "; ".join(sources[:5])
                                      + (" ..." if len(sources) > 5 else ""))}
    if args.init_weights:
        card_updates["source"] = f"fine-tuned from {args.init_weights} ({model.card.source})"
    model, history = train_model(train_vols, val_vols or None, model=model, params=params, out_stem=out,
                                 card_updates=card_updates, progress=progress)
    progress.close()
    print(f"best validation Dice {history.best_val_dice:.3f} at epoch {history.best_epoch + 1}; "
          f"{history.seconds / 60:.1f} min; weights in {targets[0]}")
    return 0
