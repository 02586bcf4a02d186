"""shared.records: metrics.jsonl's one schema, written and read back, rolled back to a checkpoint,
and read from runs made before a field existed."""
import json

import pytest

from shared.errors import UserError
from shared.records import (
    EpochRecord,
    KnnRecord,
    MetricsLog,
    PlanRecord,
    StepRecord,
    last_of,
    of_kind,
    read_records,
)


def lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_record_is_one_json_object_with_its_kind(tmp_path):
    log = MetricsLog(tmp_path)
    log.write(StepRecord(epoch=0, step=4, lr=0.1, pairs_per_s=10.0, images_per_s=20.0, loss=2.5,
                         invariance=0.1, variance=0.2, covariance=0.3, embedding_std=0.4))
    log.write(PlanRecord(step=0, epochs=1.5, seconds_per_step=0.2, budget_s=60.0,
                         budget_used_s=3.0, probes_s=12.5))
    assert lines(tmp_path) == [
        {"kind": "step", "epoch": 0, "step": 4, "lr": 0.1, "pairs_per_s": 10.0,
         "images_per_s": 20.0, "loss": 2.5, "invariance": 0.1, "variance": 0.2,
         "covariance": 0.3, "embedding_std": 0.4},
        {"kind": "plan", "step": 0, "epochs": 1.5, "seconds_per_step": 0.2, "budget_s": 60.0,
         "budget_used_s": 3.0, "probes_s": 12.5}]
    # keys sorted, as every earlier run wrote them
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[1] == (
        '{"budget_s": 60.0, "budget_used_s": 3.0, "epochs": 1.5, "kind": "plan", '
        '"probes_s": 12.5, "seconds_per_step": 0.2, "step": 0}')


def test_metrics_log_appends_and_truncates_to_a_checkpoint(tmp_path):
    log = MetricsLog(tmp_path)
    log.write(StepRecord(epoch=0, step=1, loss=2.0))
    mark = log.size()
    log.write(StepRecord(epoch=0, step=2, loss=float("nan")))
    assert lines(tmp_path)[1]["loss"] is None  # valid JSON, not NaN
    assert read_records(tmp_path)[1] == StepRecord(epoch=0, step=2)
    log.truncate(mark)
    assert read_records(tmp_path) == [StepRecord(epoch=0, step=1, loss=2.0)]


def test_records_of_an_earlier_run_read_with_the_fields_they_lack_as_none(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"kind": "epoch", "epoch": 0, "step": 4, "lr": 0.1, "epoch_time_s": 2.0, '
        '"pairs_per_s": 32.0, "loss": 1.0, "invariance": 0.1, "variance": 0.2, '
        '"covariance": 0.3, "embedding_std": 0.4}\n'
        '{"kind": "note", "text": "a kind this version does not know"}\n'
        '{"kind": "knn", "epoch": 0, "step": 4, "epochs": 1.0, "knn_top1": 0.25}\n')
    epoch, point = read_records(tmp_path)
    assert epoch == EpochRecord(epoch=0, step=4, lr=0.1, epoch_time_s=2.0, pairs_per_s=32.0,
                                loss=1.0, invariance=0.1, variance=0.2, covariance=0.3,
                                embedding_std=0.4)
    assert epoch.images_per_s is None and epoch.terms()["variance"] == 0.2
    assert point == KnnRecord(epoch=0, step=4, epochs=1.0, knn_top1=0.25)
    assert point.seconds is None


def test_records_are_picked_by_their_exact_kind(tmp_path):
    records = [StepRecord(1), EpochRecord(1), StepRecord(2), KnnRecord(2, 0.5)]
    assert of_kind(records, StepRecord) == [StepRecord(1), StepRecord(2)]
    assert last_of(records, EpochRecord) == EpochRecord(1)
    assert last_of(records, PlanRecord) is None


def test_a_corrupt_metrics_line_names_the_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "epoch": 0, "step": 1}\n'
                                            '{"step": 2\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2 is not a JSON record"):
        read_records(tmp_path)


def test_a_record_without_a_required_field_names_the_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "knn", "epoch": 0, "epochs": 1.0}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:1 lacks a field of its kind"):
        read_records(tmp_path)


def test_a_last_line_still_being_written_is_left_out(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "step", "epoch": 0, "step": 1}\n'
                                            '{"kind": "step", "epoch": 0, "st')
    assert read_records(tmp_path) == [StepRecord(epoch=0, step=1)]
