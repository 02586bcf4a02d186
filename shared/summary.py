"""The end of a training run: summary.json, then the probes of the trained backbone.

summary.json holds the framework, device and precision, the epochs and steps trained, the
training time and rate, the last epoch's loss terms (from metrics.jsonl, so a resumed run reports
them too), the kNN monitor's last point, and, once probed, each dataset's linear-probe top-1.
"""
from __future__ import annotations

from pathlib import Path

from shared.backend import Backend, Features, LinearTrainer
from shared.cli import plural
from shared.config import Config
from shared.epoch_log import Sinks
from shared.linear_probe import probe_after_training
from shared.records import TERMS, EpochRecord, KnnRecord, last_of, read_records
from shared.run_folder import Progress
from shared.runio import SUMMARY_FILE, write_json
from shared.schedule import Plan


def run_summary(run_dir: Path, framework: str, backend: Backend, plan: Plan, batch_size: int,
                train_images: int, train_time: float) -> dict:
    """The summary.json of a finished run, before the probe results are added."""
    steps = plan.total_steps
    records = read_records(run_dir)
    last_epoch, last_point = last_of(records, EpochRecord), last_of(records, KnnRecord)
    final = last_epoch.terms() if last_epoch else dict.fromkeys(TERMS)
    return {"framework": framework, "device": backend.device_name,
            "precision": backend.precision_name, "epochs": plan.epochs, "steps": steps,
            "train_images": train_images,
            "train_time_s": train_time,
            "pairs_per_s": steps * batch_size / max(train_time, 1e-9),
            "final": final,
            **({"knn_top1": last_point.knn_top1} if last_point else {})}


def finish_run(cfg: Config, framework: str, backend: Backend, run_dir: Path, train_images: int,
               progress: Progress, plan: Plan, *, trained: bool, features: Features | None,
               train_linear: LinearTrainer, sinks: Sinks) -> dict:
    """The end of a run, on the main process: write summary.json, then (unless --no-probe) probe
    the backbone's `features` and write it again with the results (and to TensorBoard, as
    probe/<dataset>_top1 at the last step); returns the summary. `trained`: this command trained
    (else an earlier one did, and this one only completes the run)."""
    summary = run_summary(run_dir, framework, backend, plan, cfg.batch_size, train_images,
                          progress.train_time_s)
    write_json(run_dir / SUMMARY_FILE, summary)
    minutes = summary["train_time_s"] / 60
    print(f"trained {plural(plan.epochs, 'epoch')} in {minutes:.1f} min" if trained else
          f"{cfg.out} had trained its {plural(plan.epochs, 'epoch')} ({minutes:.1f} min) before",
          flush=True)
    if cfg.probe:
        summary["probe"] = probe_after_training(cfg, run_dir, framework=framework,
                                                features=features, train_linear=train_linear,
                                                checkpoint_epoch=plan.epochs)
        write_json(run_dir / SUMMARY_FILE, summary)
        sinks.scalars(summary["steps"], {f"{dataset}_top1": top1
                                         for dataset, top1 in summary["probe"].items()},
                      prefix="probe/")
    sinks.close()
    return summary
