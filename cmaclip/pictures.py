"""Pictures: which title token looks where in the image (the paper's Figure 2), and confusion matrices.

`cmaclip explain` and the evaluation's TensorBoard images (evaluate.py) draw with these.

For each product we run the model once with `return_attentions=True` (the explicit attention
weights; training keeps the fused kernel, which never materializes them) and take the LAST
sequence-attention layer, averaged over heads. The sequence is [text tokens (L); image CLS;
image patches (P)], so row t of that matrix says how text token t spreads its attention.

The most relevant token is the title token with the largest attention mass on the image patches
(sum over the P patch columns of its row), among the real title tokens: SOT, EOT and padding are
excluded (SOT/EOT act as attention sinks and carry no word). Its map is its row over the patches,
renormalized to sum to 1 over the patches, reshaped to the patch grid and upsampled onto the part
of the photo the model saw (evaluation preprocessing = resize + centre crop, so the centred square
of the photo). The picture keeps the photo's aspect; the title is printed under it with the token
boxed and its attention mass named.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cmaclip.data.batch import CLIP_MEAN, CLIP_STD
from cmaclip.data.format import EOT_TOKEN_ID

DISPLAY_WIDTH = 448
MARGIN = 8
FONT_SIZE = 16
# Heat colour map anchors (value, RGB): dark blue -> light blue -> yellow -> red.
HEAT_ANCHORS = ((0.0, (20, 20, 140)), (0.35, (0, 140, 255)), (0.65, (255, 230, 0)), (1.0, (230, 0, 0)))
MAX_OVERLAY_ALPHA = 0.65


def relevant_tokens(attention: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From one layer's attention [B, H, S, S] and the text mask [B, L] of the L text positions in
    the sequence (CMAClipOutput.text_length: the model trims padding columns): for each sample, the
    position of the title token with the largest attention mass on the image patches (-1 when the
    title has no token), that mass, and its patch map [B, g, g] summing to 1 (uniform when -1)."""
    batch, _, seq_len, _ = attention.shape
    text_len = attention_mask.shape[1]
    num_patches = seq_len - text_len - 1  # minus the image CLS
    grid = math.isqrt(max(num_patches, 0))
    if num_patches <= 0 or grid * grid != num_patches:
        raise ValueError(f"attention of length {seq_len} with {text_len} text tokens leaves {num_patches} "
                         "image positions after the image CLS: not a square patch grid")
    mean_over_heads = attention.float().mean(dim=1)
    to_patches = mean_over_heads[:, :text_len, text_len + 1:]  # [B, L, P]
    mass = to_patches.sum(dim=-1)
    positions = torch.arange(text_len, device=attention_mask.device)
    last_real = attention_mask.long().sum(dim=1, keepdim=True) - 1  # the EOT
    eligible = (positions > 0) & (positions < last_real)
    best = mass.masked_fill(~eligible, -1.0).argmax(dim=1)
    has_token = eligible.any(dim=1)
    best_mass = mass.gather(1, best[:, None]).squeeze(1)
    maps = to_patches[torch.arange(batch), best]
    maps = maps / maps.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    maps[~has_token] = 1.0 / num_patches
    best = torch.where(has_token, best, torch.full_like(best, -1))
    best_mass = torch.where(has_token, best_mass, torch.zeros_like(best_mass))
    return best, best_mass, maps.reshape(batch, grid, grid)


def title_pieces(tokenizer, ids) -> list[tuple[str, bool]]:
    """The title's tokens (between SOT and the first EOT) as (text, ends a word) pairs, in order, so
    piece i is sequence position i + 1."""
    ids = [int(i) for i in np.asarray(ids).ravel()]
    end = ids.index(EOT_TOKEN_ID) if EOT_TOKEN_ID in ids else len(ids)
    title_ids = ids[1:end]
    tokens = tokenizer.hf.convert_ids_to_tokens(title_ids)
    return [(tokenizer.hf.decode([i]).strip(), token.endswith("</w>")) for i, token in zip(title_ids, tokens)]


def piece_at(position: int) -> int:
    """The title piece at a sequence position from relevant_tokens (position 1 is piece 0, after
    SOT); -1 (no token) stays -1."""
    return position - 1 if position >= 0 else -1


def unnormalize(pixel_values: torch.Tensor) -> list[Image.Image]:
    """Model inputs [B, 3, S, S] (CLIP-normalized) back to pictures, for drawing."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return [Image.fromarray(image) for image in pixels.round().byte().permute(0, 2, 3, 1).numpy()]


def heat_colours(values: np.ndarray) -> np.ndarray:
    """float [..] in [0, 1] -> uint8 [.., 3] along HEAT_ANCHORS."""
    stops = np.array([v for v, _ in HEAT_ANCHORS])
    colours = np.array([c for _, c in HEAT_ANCHORS], dtype=np.float64)
    channels = [np.interp(values, stops, colours[:, k]) for k in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def model_view_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of the photo that evaluation preprocessing (resize + centre crop) keeps."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def overlay(image: Image.Image, patch_map: np.ndarray) -> Image.Image:
    """The photo with the patch map blended over the square the model saw; outside it is dimmed."""
    image = image.convert("RGB")
    box = model_view_box(*image.size)
    side = box[2] - box[0]
    grid_image = Image.fromarray(np.asarray(patch_map, dtype=np.float32))  # mode "F"
    heat = np.asarray(grid_image.resize((side, side), Image.BILINEAR), dtype=np.float64)
    # min-max: the picture shows where the token looks MORE (an almost uniform map would otherwise
    # colour the whole square as if it were all maximal)
    spread = heat.max() - heat.min()
    heat = (heat - heat.min()) / spread if spread > 0 else np.zeros_like(heat)
    pixels = np.asarray(image, dtype=np.float64).copy()
    pixels *= 0.55  # dim everything, then restore and colour the square the model saw
    square = np.asarray(image.crop(box), dtype=np.float64)
    alpha = (MAX_OVERLAY_ALPHA * heat)[..., None]
    pixels[box[1]:box[3], box[0]:box[2]] = square * (1 - alpha) + heat_colours(heat) * alpha
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def load_font(size: int = FONT_SIZE):
    """PIL's bundled default font (scalable when FreeType is present); never downloads anything."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def layout_pieces(pieces, font, width: int) -> list[list[tuple[int, str, int]]]:
    """Word-wrap the title pieces into lines of (piece index, text, x) within `width` pixels."""
    space = max(font.getlength(" "), 6.0)  # room for the marked token's box
    lines, line, x = [], [], 0.0
    for index, (text, ends_word) in enumerate(pieces):
        piece_width = font.getlength(text)
        if line and x + piece_width > width:
            lines.append(line)
            line, x = [], 0.0
        line.append((index, text, int(x)))
        x += piece_width + (space if ends_word else 0)
    if line:
        lines.append(line)
    return lines


def draw_explanation(image: Image.Image, pieces: list[tuple[str, bool]], marked: int, patch_map: np.ndarray,
                     mass: float, display_width: int = DISPLAY_WIDTH) -> Image.Image:
    """The Figure-2 picture: overlay on top (the photo's aspect, `display_width` wide), the title
    under it with piece `marked` boxed (-1: none), and a caption naming the token."""
    photo = overlay(image, patch_map) if marked >= 0 else image.convert("RGB")
    height = max(1, round(display_width * photo.height / photo.width))
    photo = photo.resize((display_width, height), Image.BICUBIC)
    font = load_font()
    line_height = int(font.size * 1.5) if hasattr(font, "size") else 16
    lines = layout_pieces(pieces, font, display_width - 2 * MARGIN) if pieces else []
    if marked >= 0:
        caption = f'"{pieces[marked][0]}": {mass:.0%} of its attention on the image'
    else:
        caption = "no title token to explain" if not pieces else "no image attention"
    text_height = MARGIN + line_height * (len(lines) + 1) + MARGIN
    canvas = Image.new("RGB", (display_width, height + text_height), "white")
    canvas.paste(photo, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = height + MARGIN
    for line in lines:
        for index, text, x in line:
            x += MARGIN
            if index == marked:
                left, top, right, bottom = draw.textbbox((x, y), text, font=font)
                draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=(255, 230, 0), outline=(230, 0, 0))
            draw.text((x, y), text, fill=(200, 0, 0) if index == marked else (0, 0, 0), font=font)
        y += line_height
    draw.text((MARGIN, y), caption, fill=(90, 90, 90), font=font)
    return canvas


def confusion_image(confusion: np.ndarray, class_names: list[str], cell: int = 14) -> np.ndarray:
    """uint8 HWC picture of the row-normalized confusion matrix (rows: true, columns: predicted),
    limited to the classes that occur, names on the left and on top."""
    seen = np.flatnonzero((confusion.sum(axis=1) > 0) | (confusion.sum(axis=0) > 0))
    if len(seen) == 0:
        seen = np.arange(min(1, len(class_names)))
    matrix = confusion[np.ix_(seen, seen)].astype(np.float64)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    names = [class_names[c][:24] for c in seen]
    font = load_font(11)
    label_width = max(int(max(font.getlength(name) for name in names)) + 6, 110)  # room for the legend
    size = len(seen) * cell
    canvas = Image.new("RGB", (label_width + size + 2, label_width + size + 2), "white")
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((2, label_width + i * cell), name, fill="black", font=font)
        for j in range(len(seen)):
            rate = rates[i, j]  # white (0) to dark blue (1)
            colour = (int(255 * (1 - rate)), int(255 * (1 - 0.75 * rate)), int(255 * (1 - 0.3 * rate)))
            box = (label_width + j * cell, label_width + i * cell, label_width + (j + 1) * cell - 1,
                   label_width + (i + 1) * cell - 1)
            draw.rectangle(box, fill=colour, outline=(220, 220, 220))
    top = Image.new("RGB", (label_width, size), "white")
    top_draw = ImageDraw.Draw(top)
    for j, name in enumerate(names):
        top_draw.text((2, j * cell), name, fill="black", font=font)
    canvas.paste(top.rotate(90, expand=True), (label_width, 0))
    draw.text((2, 2), "rows: true class", fill="gray", font=font)
    draw.text((2, 16), "columns: predicted", fill="gray", font=font)
    return np.asarray(canvas)
