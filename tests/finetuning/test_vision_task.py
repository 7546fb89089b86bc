"""`finetune.py --task vision` end to end at tiny sizes: every strategy trains, the folder holds what it says."""

import json

import pytest

import lora
from finetuning.experiment import FinetuneConfig, check_config
from finetuning.vision import STRATEGIES, VisionSizes, pretrain_base, run_vision
from vision import load_vlm, save_vlm

TINY = VisionSizes(n_base_train=32, n_new_train=16, n_eval=8, vit_steps=2, base_steps=3, finetune_steps=2,
                   batch_size=4)


def test_every_strategy_trains_and_is_saved(tmp_path):
    save_vlm(*pretrain_base(seed=0, sizes=TINY, say=lambda line: None), tmp_path / "base")
    config = FinetuneConfig(task="vision", base=str(tmp_path / "base"), out=str(tmp_path / "out"), threads=1,
                            rank=4, encoder_rank=2, plot=False)
    check_config(config)
    results = run_vision(config, sizes=TINY)
    assert [row["strategy"] for row in results["results"]] == list(STRATEGIES)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {row["strategy"]: row for row in saved["results"]}
    assert rows["encoder"]["trainable_params"] < rows["both"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["full"]["loss_vs_full"] == 0 and all(row["disk_bytes"] > 0 for row in rows.values())
    base, _ = load_vlm(tmp_path / "base")  # each adapter loads back onto the base it came from
    assert lora.load_lora_config(tmp_path / "out" / "encoder_adapter").rank_pattern == {r"encoder\..*": 2}
    lora.load_adapter(base, tmp_path / "out" / "both_adapter")
    load_vlm(tmp_path / "out" / "full_finetuned")


def test_options_of_other_tasks_are_refused():
    with pytest.raises(ValueError, match="--task vision does not use --targets"):
        check_config(FinetuneConfig(task="vision", targets="q_proj"))
    with pytest.raises(ValueError, match="options of --task vision"):
        check_config(FinetuneConfig(encoder_rank=4))
