"""Attention pictures (pictures.py) and `cmaclip explain`: the token choice, the map, the PNG."""
import numpy as np
import pytest
import torch
from PIL import Image

from cmaclip import explain, pictures

TEXT_LEN, GRID = 6, 2
SEQ = TEXT_LEN + 1 + GRID * GRID


def attention_with(rows: dict[int, list[float]], heads: int = 2) -> torch.Tensor:
    """[1, heads, S, S]: text row t gets the given attention over the patch columns (the rest of the
    row goes to the image CLS); head 1 doubles head 0's patch attention so the head mean matters."""
    attention = torch.zeros(1, heads, SEQ, SEQ)
    for t in range(SEQ):
        attention[0, :, t, TEXT_LEN] = 1.0
    for t, patch_values in rows.items():
        values = torch.tensor(patch_values)
        for h in range(heads):
            scaled = values * (1 + h) / 2
            attention[0, h, t, TEXT_LEN + 1:] = scaled
            attention[0, h, t, TEXT_LEN] = 1 - scaled.sum()
    return attention


def test_most_relevant_token_ignores_sot_eot_and_padding():
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])  # SOT, two title tokens, EOT, padding
    attention = attention_with({
        0: [0.3, 0.3, 0.3, 0.0],   # SOT: the largest mass, must be ignored
        1: [0.1, 0.0, 0.0, 0.1],
        2: [0.0, 0.3, 0.1, 0.0],   # the answer: mass 0.4 (head mean of 0.2 and 0.4 = 0.3)
        3: [0.2, 0.2, 0.2, 0.2],   # EOT
        5: [0.4, 0.4, 0.0, 0.0],   # padding
    })
    best, mass, maps = pictures.relevant_tokens(attention, mask)
    assert best.tolist() == [2]
    assert mass.item() == pytest.approx(0.4 * 0.75)
    assert maps.shape == (1, GRID, GRID)
    assert maps.sum().item() == pytest.approx(1.0)
    assert maps[0].flatten().tolist() == pytest.approx([0.0, 0.75, 0.25, 0.0])


def test_empty_title_has_no_token_and_a_uniform_map():
    mask = torch.tensor([[1, 1, 0, 0, 0, 0]])
    best, mass, maps = pictures.relevant_tokens(attention_with({}), mask)
    assert best.tolist() == [-1] and mass.tolist() == [0.0]
    assert maps[0].flatten().tolist() == pytest.approx([0.25] * 4)


def test_sequence_that_is_not_a_patch_grid_is_rejected():
    with pytest.raises(ValueError, match="not a square patch grid"):
        pictures.relevant_tokens(torch.zeros(1, 1, TEXT_LEN + 1 + 3, TEXT_LEN + 1 + 3), torch.ones(1, TEXT_LEN))


def test_picture_keeps_the_photo_aspect_and_prints_the_title_under_it(tmp_path):
    photo = Image.new("RGB", (300, 200), (0, 160, 0))
    patch_map = np.array([[1.0, 0.0], [0.0, 0.0]])
    pieces = [("turtle", True), ("check", True), ("shirt", True)]
    picture = pictures.draw_explanation(photo, pieces, marked=2, patch_map=patch_map, mass=0.5, display_width=450)
    path = tmp_path / "p.png"
    picture.save(path)
    reread = Image.open(path)
    assert reread.format == "PNG" and reread.width == 450
    photo_height = 300  # 450 * 200 / 300
    assert reread.height > photo_height + 20  # title + caption under the photo
    pixels = np.asarray(reread.convert("RGB")).astype(int)
    assert (pixels[photo_height - 2, 5] != 255).any()          # still photo
    assert (pixels[-3, -3] == 255).all()                       # white text panel
    # The map's hot patch (top-left of the square the model saw) is coloured, the cold one is not.
    square_left = (450 - 300) // 2
    hot, cold = pixels[20, square_left + 20], pixels[photo_height - 20, square_left + 280]
    assert abs(hot - np.array([0, 160, 0])).sum() > 100
    assert abs(cold - np.array([0, 160, 0])).sum() < 60
    # Outside the centre square the photo is dimmed, not coloured.
    assert pixels[150, 5].tolist() == pytest.approx([0, 88, 0], abs=2)


def test_layout_wraps_long_titles():
    font = pictures.load_font()
    pieces = [("word", True)] * 60
    lines = pictures.layout_pieces(pieces, font, width=200)
    assert len(lines) > 3
    assert sum(len(line) for line in lines) == 60
    assert all(x + font.getlength(text) <= 200 for line in lines for _, text, x in line)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from cmaclip.model import CMAClip, ModelConfig

    folder = tmp_path_factory.mktemp("run") / "model"
    CMAClip(ModelConfig(preset="tiny"), {"colour": ["red", "blue"]}).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])  # bf16: the autocast GPUs run (auto)
def test_explain_command_draws_pictures_with_maps_that_sum_to_one(tiny_model_dir, tmp_path, capsys, mixed_precision):
    import json

    wide = Image.new("RGB", (300, 200), (200, 0, 0))
    wide.paste((0, 0, 200), (150, 0, 300, 200))  # left half red, right half blue
    wide.save(tmp_path / "wide.jpg", quality=95)
    Image.new("RGB", (100, 160), (0, 150, 0)).save(tmp_path / "tall.jpg")
    rows = [{"id": "wide/1", "image": "wide.jpg", "text": "Red and blue striped shirt"},
            {"id": "text-only", "text": "No picture here"},
            {"id": "tall", "image": "tall.jpg", "text": ""},
            {"id": "over-limit", "image": "tall.jpg", "text": "never drawn"}]
    catalogue = tmp_path / "in.jsonl"
    catalogue.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "pictures"
    explain.main(["--checkpoint", str(tiny_model_dir), "--input", str(catalogue), "--out", str(out), "--limit", "2",
                  "--mixed-precision", mixed_precision])
    printed = capsys.readouterr()
    assert "line 2 (id text-only): no usable image" in printed.err
    index = json.loads((out / "explanations.json").read_text())["explanations"]
    assert [row["id"] for row in index] == ["wide/1", "tall"]
    assert sorted(p.name for p in out.glob("*.png")) == ["tall.png", "wide_1.png"]

    grid = 64 // 8  # the tiny preset: 64 px images, 8 px patches
    for row in index:
        patch_map = np.array(row["patch_map"])
        assert patch_map.shape == (grid, grid)
        assert patch_map.sum() == pytest.approx(1.0, abs=1e-4)
    assert index[0]["token"] in {"red", "and", "blue", "striped", "shirt"}
    assert 0 < index[0]["attention_on_image"] <= 1
    assert index[1]["token"] is None  # no title: nothing to mark

    wide_png, tall_png = Image.open(out / "wide_1.png"), Image.open(out / "tall.png")
    assert wide_png.width == tall_png.width == pictures.DISPLAY_WIDTH
    # The photo keeps its aspect: 448 x 299 for 300 x 200, 448 x 717 for 100 x 160, then the text.
    for png, photo_height in ((wide_png, round(448 * 200 / 300)), (tall_png, round(448 * 160 / 100))):
        pixels = np.asarray(png.convert("RGB")).astype(int)
        assert png.height > photo_height
        assert (pixels[photo_height - 3, 2] < 200).any()       # last photo rows: dimmed, not white
        assert (pixels[photo_height + 2, 2] == 255).all()     # the text panel starts right after
    # Outside the centre square (the left strip of the wide photo) the picture is the photo, dimmed.
    left = np.asarray(wide_png.convert("RGB"))[150, 10].astype(int)
    assert left.tolist() == pytest.approx([110, 0, 0], abs=6)


def test_explain_refuses_a_model_without_sequence_attention(tmp_path, capsys):
    from cmaclip.model import CMAClip, ModelConfig

    CMAClip(ModelConfig(preset="tiny", fusion="concat"), {"colour": ["red", "blue"]}).save_pretrained(tmp_path / "m")
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "x"}\n')
    with pytest.raises(SystemExit):
        explain.main(["--checkpoint", str(tmp_path / "m"), "--input", str(tmp_path / "in.jsonl"),
                      "--out", str(tmp_path / "out")])
    assert "model.fusion='concat' has no sequence-wise attention" in capsys.readouterr().err


def test_the_marked_word_is_the_title_word_whose_attention_is_scripted_onto_the_image():
    """A stand-in model whose last-layer attention sends one title word's attention to the image
    patches: explain must mark exactly that word (sequence position 1 is the first piece, after SOT)."""
    from types import SimpleNamespace

    from cmaclip.data.tokenizer import load_tokenizer
    from cmaclip.model.cmaclip import CMAClipOutput
    from cmaclip.products import Product

    tokenizer = load_tokenizer(77)
    words = ["turtle", "check", "navy", "shirt"]
    chosen = words.index("navy")

    class ScriptedModel:
        config = SimpleNamespace(image_size=64)

        def __call__(self, input_ids, attention_mask, return_attentions=False, **rest):
            text_length = int(attention_mask.sum())  # SOT, 4 one-piece words, EOT
            length = text_length + 1 + GRID * GRID
            attention = torch.zeros(1, 2, length, length)
            attention[..., text_length] = 1.0  # every query looks at the image [CLS] only ...
            attention[0, :, 1 + chosen, text_length] = 0.2  # ... but the chosen word at the patches
            attention[0, :, 1 + chosen, text_length + 1:] = 0.2
            return CMAClipOutput(logits={}, modality_weights=torch.zeros(1, 1, 2), attentions=[attention],
                                 text_length=text_length)

    product = Product(line=1, id="a", title=" ".join(words), image=Image.new("RGB", (64, 64)))
    [found] = explain.explain_products(ScriptedModel(), [product], tokenizer, "cpu")
    assert [piece for piece, _ in found["pieces"]] == words
    assert found["pieces"][found["marked"]][0] == "navy"
    assert found["mass"] == pytest.approx(0.8)
