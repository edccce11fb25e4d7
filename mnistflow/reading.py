"""Reading a picture: the digits of a number, left to right, each with the model's confidence,
and "unsure" where the model is less confident than it was on nearly all its validation pictures.

A picture's ink (images.ink_of) is first split into strokes: its connected parts less specks,
with a part that lies over, under or within another (a 5's detached bar) joined to it. Digits
written apart are strokes of their own. A stroke wider than a digit may be digits that touch: it
can be cut at columns a few pixels apart and where its ink is thinnest, never through a filled
shape. Every piece between two
such columns that is as wide as a digit is read, all in one batch, and the pieces that tile the
stroke with the highest sum of log-confidences (plus BONUS a piece) are the digits: a digit cut
in two reads worse than whole, two digits read as one worse than each alone. Each piece is
fitted as MNIST's digits were (images.fit) before it is read.

Every model mnistflow logs carries its abstain threshold (logged_model.ABSTAIN_KEY), chosen on
its validation pictures; a model without one never abstains.
"""
from dataclasses import dataclass

import numpy as np

from mnistflow import images, logged_model

SPECK = 0.05    # a part with less ink than this share of the largest one's is a speck, not a digit's
TOGETHER = 0.5  # parts sharing this share of the narrower one's columns, or some columns and less
                # than this share of rows (one over the other), are one digit's
WIDE = 1.0      # a stroke wider than this times the number's height may be digits that touch
STEP = 0.15     # ... and is tried cut every this share of that height, and where its ink is thinnest,
NARROWEST, WIDEST = 0.15, 1.5  # ... into pieces this many times that height wide, where a cut crosses
THROUGH = 0.5   # ... ink in no more than this share of that height's rows (strokes, not a filled shape)
BONUS = 0.05    # added to a tiling's sum of log-confidences per piece (chosen by bench/read_numbers.py)
UNSURE = "unsure"


@dataclass
class Reading:
    """What a model read in one picture: a row of class probabilities per digit, left to right."""
    probabilities: np.ndarray  # (digits, classes)
    inputs: np.ndarray         # (digits, 28, 28): what the model saw
    abstain_below: float       # the model's abstain threshold; 0: it never abstains

    @property
    def unsure(self) -> bool:
        return bool((self.probabilities.max(1) < self.abstain_below).any())

    def number(self, abstain: bool = True) -> str:
        """The digits read; with `abstain`, "?" for each one the model is unsure of."""
        return "".join("?" if abstain and p.max() < self.abstain_below else str(int(p.argmax()))
                       for p in self.probabilities)

    def answer(self, classes: list[str], abstain: bool = True) -> str:
        """The class of a single digit, or the number read; "unsure" where the model is unsure of
        every digit (no number then: a garment cut in two is no two-digit number)."""
        if abstain and (self.probabilities.max(1) < self.abstain_below).all():
            return UNSURE
        if len(self.probabilities) == 1:
            return classes[int(self.probabilities[0].argmax())]
        return self.number(abstain) + (f" ({UNSURE})" if abstain and self.unsure else "")

    def describe(self, classes: list[str], top: int = 3, abstain: bool = True) -> str:
        """The answer, then the `top` classes' probabilities of a single digit or each digit's confidence."""
        if len(self.probabilities) == 1:
            p = self.probabilities[0]
            shown = ", ".join(f"{classes[k]} {p[k]:.4f}" for k in np.argsort(p)[::-1][:top])
        else:
            shown = ", ".join(f"{int(p.argmax())} {p.max():.4f}" for p in self.probabilities)
        return f"{self.answer(classes, abstain)}  ({shown})"


def strokes(ink: np.ndarray) -> list[np.ndarray]:
    """Crops of the ink's strokes, left to right: its connected parts less specks, a part that
    lies over, under or within another joined to it."""
    from scipy import ndimage

    labels, count = ndimage.label(ink > 0, structure=np.ones((3, 3)))
    mass = ndimage.sum_labels(ink, labels, index=np.arange(1, count + 1))
    boxes = ndimage.find_objects(labels)

    def shared(a: slice, b: slice) -> float:  # the share of the shorter span that both cover
        return (min(a.stop, b.stop) - max(a.start, b.start)) / min(a.stop - a.start, b.stop - b.start)

    groups = []
    for i in sorted(range(count), key=lambda i: boxes[i][1].start):
        if mass[i] < SPECK * mass.max():
            continue
        rows, cols = boxes[i]
        joined = next((group for group in groups if shared(cols, boxes[group[0]][1]) >= TOGETHER
                       or shared(cols, boxes[group[0]][1]) > 0 and shared(rows, boxes[group[0]][0]) < TOGETHER), None)
        if joined is None:
            groups.append([i])
        else:
            joined.append(i)
    crops = []
    for group in groups:
        rows, cols = np.nonzero(np.isin(labels, [i + 1 for i in group]))
        window = np.s_[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        crops.append(np.where(np.isin(labels[window], [i + 1 for i in group]), ink[window], 0))
    return crops


def cut_points(crop: np.ndarray, height: int) -> list[int]:
    """Columns where a stroke might be cut into digits `height` tall, left to right: every STEP
    of the height, and where the stroke's ink is thinner than on both sides (where two digits meet)."""
    width = crop.shape[1]
    if width <= WIDE * height:
        return []
    column_ink = np.convolve(crop.sum(0), np.ones(3) / 3, mode="same")
    inner = np.arange(1, width - 1)
    thinnest = inner[(column_ink[inner] < column_ink[inner - 1]) & (column_ink[inner] <= column_ink[inner + 1])]
    step = max(2, round(STEP * height))
    # Never across a filled shape: slices of a blob would read as 1s.
    inked_rows = np.count_nonzero(crop, axis=0)
    return sorted(column for column in {*thinnest.tolist(), *range(step, width - 1, step)}
                  if inked_rows[column] <= THROUGH * height)


def read(model, inks: list[np.ndarray], dataset: str = "mnist", one_digit: bool = False) -> list[Reading]:
    """What `model` reads in each picture's ink (images.ink_of): a number's digits, or with
    `one_digit` (and always for garments) the whole picture as one. One batch for all pictures."""
    threshold = logged_model.abstain_threshold(model)
    if one_digit or dataset != "mnist":
        inputs = np.stack([images.fit(ink, dataset) for ink in inks])
        probabilities = logged_model.probabilities(model, inputs[:, None])
        return [Reading(probabilities[i:i + 1], inputs[i:i + 1], threshold) for i in range(len(inks))]
    inputs, pieces = [], {}  # the pieces' inputs; (picture, stroke) -> [(first edge, last edge, input's index)]
    for picture, ink in enumerate(inks):
        crops = strokes(ink)
        height = max(crop.shape[0] for crop in crops)  # a number's digits are about as tall as its tallest
        for stroke, crop in enumerate(crops):
            edges = [0, *cut_points(crop, height), crop.shape[1]]
            found = pieces[picture, stroke] = []
            for i, left in enumerate(edges):
                for j in range(i + 1, len(edges)):
                    whole = (i, j) == (0, len(edges) - 1)
                    if whole or NARROWEST * height <= edges[j] - left <= WIDEST * height:
                        found.append((i, j, len(inputs)))
                        inputs.append(images.fit(crop[:, left:edges[j]], dataset))
    inputs = np.stack(inputs)
    probabilities = logged_model.probabilities(model, inputs[:, None])
    confidence = np.log(probabilities.max(1))
    chosen = {picture: [] for picture in range(len(inks))}
    for (picture, _), found in pieces.items():
        # tilings[j][n]: the n pieces from edge 0 to edge j with the highest sum of log-confidences.
        tilings = {0: {0: (0.0, [])}}
        for i, j, k in found:  # by first edge: each tiling to i is complete before it is extended
            for n, (total, used) in list(tilings.get(i, {}).items()):
                if total + confidence[k] > tilings.setdefault(j, {}).get(n + 1, (-np.inf,))[0]:
                    tilings[j][n + 1] = (total + confidence[k], used + [k])
        across = tilings[max(j for _, j, _ in found)]  # the tilings of the whole stroke, by count of pieces
        chosen[picture] += max(across.items(), key=lambda item: item[1][0] + BONUS * item[0])[1][1]
    return [Reading(probabilities[chosen[p]], inputs[chosen[p]], threshold) for p in range(len(inks))]
