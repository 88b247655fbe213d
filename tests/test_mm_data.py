"""Image + text instruction data (training/mm_data.py): bad lines, the image processor, masks."""
import json

import pytest
import torch


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_mole.training.tokenizer import ROLE_TOKENS, train_tokenizer

    tok = train_tokenizer(["what colour is the shape red blue circle square"] * 20,
                          tmp_path_factory.mktemp("tok"), vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS) + ["<image>"]})
    return tok


def _processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


def test_image_jsonl_bad_lines_and_rows(tmp_path, tokenizer):
    from PIL import Image

    from megatron_mole.training.mm_data import MultimodalDataset, collate, read_image_jsonl

    Image.new("RGB", (20, 24), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    user = {"role": "user", "content": "<image>\nwhat colour is the shape?"}
    good = {"domain": "en", "image": "red.png", "messages": [user, {"role": "assistant", "content": "red"}]}
    lines = [
        good,
        dict(good, image="missing.png"),
        dict(good, image="broken.png"),
        dict(good, messages=[{"role": "user", "content": "<image><image> what?"}, good["messages"][1]]),
        dict(good, messages=[{"role": "user", "content": "no image"}, good["messages"][1]]),
        dict(good, image=3),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n")
    examples, report = read_image_jsonl(path)
    reasons = [b.reason for b in report.bad_lines]
    assert [b.line for b in report.bad_lines] == [2, 3, 4, 5, 6, 7], reasons
    assert "does not exist" in reasons[0] and "cannot be read" in reasons[1]
    assert "2 image placeholders" in reasons[2] and "0 image placeholders" in reasons[3]
    assert "'image'" in reasons[4] and "invalid JSON" in reasons[5]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    dataset = MultimodalDataset(examples, tokenizer, _processor(), seq_length=24, image_token_id=image_id,
                                report=report)
    batch = collate(dataset.items, 24, dataset.pad_token_id, image_id)
    assert batch["images"].shape == (1, 3, 16, 16) and batch["images"].dtype == torch.float32
    ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
    assert int((ids == image_id).sum()) == 1
    answer = tokenizer.decode(batch["labels"][0][mask > 0])
    assert answer.startswith("red") and answer.endswith(tokenizer.eos_token), answer
    prompt = tokenizer.decode(ids[batch["prompt_mask"][0]])
    assert "what colour is the shape?" in prompt and "<image>" not in prompt and "red" not in prompt
    with pytest.raises(Exception, match="data.jsonl:2"):
        read_image_jsonl(path, strict=True)
