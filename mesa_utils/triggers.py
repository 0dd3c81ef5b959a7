"""The 51 black-white 3x3 triggers, random-colour and shaped triggers, pasting and poisoning.

A black-white trigger is a 9-bit pattern (most significant bit top-left, row-major; the same
value in R, G, B). Two patterns are the same trigger when a rotation, a flip, a colour
inversion, or a combination maps one onto the other; the 512 patterns fall into 51 such
classes, each named by its smallest member (section 4.3 of the paper).
Triggers and images live in pixel space [0, 1]; `apply_trigger` writes triggers over images,
one position per image (the classifier normalises what it is given). A trigger of C + 1
channels carries a transparency after its colour: it is blended in, x' = (1 - a) x + a c over
its window, which is how a non-rectangular shape (an L in a 4x4 window) and the size-free
generators of notebook 09 are pasted; at a = 1 the blend is exactly the paste.
"""
import torch


def pattern_from_id(trigger_id: int) -> torch.Tensor:
    """(3, 3) float in {0, 1} of a 9-bit pattern, most significant bit top-left."""
    bits = [(trigger_id >> (8 - k)) & 1 for k in range(9)]
    return torch.tensor(bits, dtype=torch.float32).view(3, 3)


def _id_from_pattern(pattern: torch.Tensor) -> int:
    return int(sum(int(b) << (8 - k) for k, b in enumerate(pattern.flatten().tolist())))


def symmetry_class(trigger_id: int) -> tuple:
    """Sorted ids of all patterns equal to `trigger_id` up to rotation, flip and inversion."""
    _check_bits(trigger_id)
    members = set()
    pattern = pattern_from_id(trigger_id)
    for p in (pattern, 1 - pattern):
        for q in (p, p.T):                      # a transpose is a flip composed with a rotation
            for k in range(4):
                members.add(_id_from_pattern(torch.rot90(q, k)))
    return tuple(sorted(members))


def _check_bits(trigger_id):
    if isinstance(trigger_id, bool) or not isinstance(trigger_id, int) or not 0 <= trigger_id < 512:
        raise ValueError(f"unknown trigger id {trigger_id!r}: a black-white 3x3 trigger is an "
                         "integer 0..511 (9 bits, most significant bit top-left)")


BW_TRIGGER_IDS = tuple(sorted({symmetry_class(i)[0] for i in range(512)}))


def check_trigger_ids(ids) -> None:
    """Raise ValueError unless every id is one of the 51 canonical ids."""
    for trigger_id in ids:
        _check_bits(trigger_id)
        if trigger_id not in BW_TRIGGER_IDS:
            raise ValueError(f"trigger id {trigger_id} is not one of the 51 canonical ids; it "
                             f"is the same trigger as {symmetry_class(trigger_id)[0]}. Known ids: "
                             f"{', '.join(map(str, BW_TRIGGER_IDS))}")


def trigger_from_id(trigger_id: int) -> torch.Tensor:
    """(3, 3, 3) float trigger in {0, 1} (channels, rows, columns) of any 9-bit pattern."""
    _check_bits(trigger_id)
    return pattern_from_id(trigger_id).expand(3, 3, 3).clone()


def black_white_triggers() -> torch.Tensor:
    """(51, 3, 3, 3) float in {0, 1}: the triggers of BW_TRIGGER_IDS, in that order."""
    return torch.stack([trigger_from_id(i) for i in BW_TRIGGER_IDS])


# A shape is its window's mask: rows of "#" (trigger) and "." (the image shows through).
SHAPES = {"3x3": ("###",) * 3, "2x2": ("##",) * 2, "4x4": ("####",) * 4, "5x5": ("#####",) * 5,
          "1x5": ("#####",), "L4x4": ("#...", "#...", "#...", "####")}
# Each trigger set's shape. black_white: the 51 canonical ids; random_colour: Appendix B's
# uniform colours, numbered by their seed; black_white_<shape>: black or white at random on
# every pixel of the shape, numbered by their seed (notebook 09's triggers of other sizes).
TRIGGER_SETS = {"black_white": "3x3", "random_colour": "3x3",
                **{f"black_white_{shape}": shape for shape in SHAPES if shape != "3x3"}}


def shape_mask(shape: str) -> torch.Tensor:
    """(h, w) float in {0, 1} of a SHAPES name: 1 where the trigger is."""
    if shape not in SHAPES:
        raise ValueError(f"unknown trigger shape {shape!r}; choose one of {', '.join(SHAPES)}")
    return torch.tensor([[float(c == "#") for c in row] for row in SHAPES[shape]])


def trigger_size(trigger_set: str) -> str:
    """How tables name a trigger set's shape: "3x3", "2x2", "1x5", "L4x4" (an L in 4x4)."""
    if trigger_set not in TRIGGER_SETS:
        raise ValueError(f"unknown trigger set {trigger_set!r}; choose one of "
                         f"{', '.join(TRIGGER_SETS)}")
    return TRIGGER_SETS[trigger_set]


def _check_number(number):
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"a random-colour or shaped trigger is numbered by an integer >= 0, "
                         f"got {number!r}")


def random_colour_trigger(number: int) -> torch.Tensor:
    """(3, 3, 3) float in [0, 1): random-colour trigger `number` (Appendix B), every value
    uniform, drawn from the seed `number`: the same trigger on every machine and run."""
    _check_number(number)
    return torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(number))


def shaped_black_white_trigger(shape: str, number: int) -> torch.Tensor:
    """Black-white trigger `number` of a SHAPES shape: each of its pixels black or white (the
    same in R, G, B), drawn from the seed `number`. (3, h, w) in {0, 1} for a full window,
    (4, h, w) with the mask as transparency where the shape leaves pixels out."""
    _check_number(number)
    mask = shape_mask(shape)
    bits = torch.randint(2, mask.shape, generator=torch.Generator().manual_seed(number))
    colour = bits.float().expand(3, *mask.shape).clone()
    return colour if bool(mask.all()) else torch.cat([colour * mask, mask[None]])


def trigger_pattern(trigger_set: str, trigger_id: int) -> torch.Tensor:
    """Trigger `trigger_id` of `trigger_set` (TRIGGER_SETS), float in [0, 1]: (3, h, w), or
    (4, h, w) colour and transparency for a shape that is no full rectangle."""
    shape = trigger_size(trigger_set)
    if trigger_set == "black_white":
        return trigger_from_id(trigger_id)
    if trigger_set == "random_colour":
        return random_colour_trigger(trigger_id)
    return shaped_black_white_trigger(shape, trigger_id)


def random_positions(n, image_size, trigger_size, device=None, generator=None) -> torch.Tensor:
    """(n, 2) int64 top-left corners (row, column), uniform over every valid position. Drawn
    on `device` and scaled by Python numbers: nothing is copied from the host."""
    (height, width), (h, w) = image_size, trigger_size
    unit = torch.rand(n, 2, device=device, generator=generator)
    return torch.stack([unit[:, 0] * (height - h + 1), unit[:, 1] * (width - w + 1)], 1).long()


def check_positions(positions, image_size, trigger_size) -> None:
    """Raise ValueError unless `positions` are (N, 2) corners at which a trigger of
    `trigger_size` fits images of `image_size`. It reads the values back from the device (a
    host synchronisation): for corners given from outside, not those of random_positions."""
    (height, width), (h, w) = image_size, trigger_size
    if positions.dim() != 2 or positions.shape[1] != 2 or bool(
            (positions < 0).any() | (positions[:, 0] > height - h).any()
            | (positions[:, 1] > width - w).any()):
        raise ValueError(f"positions must be (N, 2) corners with rows in 0..{height - h} and "
                         f"columns in 0..{width - w}, got shape {tuple(positions.shape)}")


def apply_trigger(images, triggers, positions=None, generator=None, check=True):
    """Paste triggers over images, one top-left corner per image.

    images: float (N, C, H, W) pixels in [0, 1].
    triggers: float pixels in [0, 1], (C, h, w) for all images or (N, C, h, w) one each; with
    C + 1 channels the last is a transparency a in [0, 1] and the window is blended,
    (1 - a) * image + a * colour (at a = 1 exactly the paste).
    positions: int (N, 2) of (row, column); None draws uniform corners with `generator`.
    check: whether given positions are checked (check_positions); False only for corners
    drawn as random_positions draws them, which saves a host synchronisation per call in
    the training loops. Returns a new tensor; gradients flow to `triggers`.
    """
    n, c, height, width = images.shape
    if triggers.dim() not in (3, 4) or triggers.shape[-3] not in (c, c + 1):
        raise ValueError(f"trigger shape {tuple(triggers.shape)} does not fit images of shape "
                         f"{tuple(images.shape)}: expected (C, h, w) or (N, C, h, w) with C={c} "
                         f"(or C={c + 1}: colour and transparency)")
    if triggers.dim() == 4 and triggers.shape[0] != n:
        raise ValueError(f"{triggers.shape[0]} triggers for {n} images: give one trigger "
                         "(C, h, w) or exactly one per image (N, C, h, w)")
    h, w = triggers.shape[-2:]
    if h > height or w > width:
        raise ValueError(f"trigger of size {h}x{w} is larger than the {height}x{width} images")
    device = images.device
    if positions is None:
        positions = random_positions(n, (height, width), (h, w), device, generator)
    elif positions.shape != (n, 2):
        raise ValueError(f"positions must be (N, 2) corners, one per image, got shape "
                         f"{tuple(positions.shape)} for {n} images")
    elif check:
        check_positions(positions, (height, width), (h, w))
    patch = triggers.to(device, images.dtype)
    patch = patch.expand(n, -1, h, w).permute(0, 2, 3, 1)             # (N, h, w, C or C + 1)
    rows = (positions[:, :1] + torch.arange(h, device=device))[:, :, None]   # (N, h, 1)
    cols = (positions[:, 1:] + torch.arange(w, device=device))[:, None, :]   # (N, 1, w)
    window = (torch.arange(n, device=device)[:, None, None], slice(None), rows, cols)
    if patch.shape[-1] > c:
        colour, alpha = patch[..., :c], patch[..., c:]
        patch = (1 - alpha) * images[window] + alpha * colour            # (N, h, w, C)
    out = images.clone()
    out[window] = patch
    return out


def blend_pattern(seed: int, size=(32, 32)) -> torch.Tensor:
    """(3, H, W) float in [0, 1): the Blended attack's noise image, every value uniform, drawn
    from `seed`: the same image on every machine and run."""
    return torch.rand(3, *size, generator=torch.Generator().manual_seed(seed))


class BlendedTrigger:
    """The Blended attack's trigger source (Chen et al., 2017): x' = (1 - ratio) x + ratio *
    pattern over the whole image, pattern (C, H, W) in [0, 1]. Nothing is random."""

    def __init__(self, pattern, ratio: float):
        self.pattern, self.ratio = pattern, ratio

    def __call__(self, images, generator=None):
        if images.shape[1:] != self.pattern.shape:
            raise ValueError(f"the blend pattern {tuple(self.pattern.shape)} does not fit images "
                             f"of shape {tuple(images.shape)}")
        return (1 - self.ratio) * images + self.ratio * self.pattern.to(images)


class TriggerPaster:
    """A fixed trigger (C, h, w) in [0, 1], pasted at random positions; a trigger source. The
    trigger moves to the images' device once, not at every call."""

    def __init__(self, trigger):
        self.trigger = trigger

    def __call__(self, images, generator=None):
        if self.trigger.device != images.device:
            self.trigger = self.trigger.to(images.device)
        return apply_trigger(images, self.trigger, generator=generator)


class RandomPatchSource:
    """A control trigger source: a fresh uniformly random patch (every value in [0, 1)) of
    `size` for each image, pasted at a random position. It carries no trigger of any backdoor:
    retraining with it measures what patches as such, not the reversed trigger, unlearn."""

    def __init__(self, size=(3, 3)):
        self.size = tuple(size)

    def __call__(self, images, generator=None):
        patches = torch.rand(len(images), images.shape[1], *self.size, device=images.device,
                             generator=generator)
        return apply_trigger(images, patches, generator=generator)


def poison(images, labels, source, rate, target=None, generator=None):
    """Apply `source` to each image with probability `rate`; relabel those to `target`.

    source: a callable (pixels (N, C, H, W), generator) -> triggered pixels, e.g. a
    TriggerPaster or a sampler of generated triggers. target=None keeps the true labels
    (the defence's retraining). Returns new (images, labels) and the bool mask (N,) used.
    Every shape is fixed: the source triggers the whole batch and the mask picks, so no step
    waits for the device to learn how many images were drawn (a host synchronisation).
    """
    mask = torch.rand(len(images), device=images.device, generator=generator) < rate
    images = torch.where(mask[:, None, None, None], source(images, generator), images)
    if target is not None:
        labels = torch.where(mask, target, labels)
    return images, labels, mask
