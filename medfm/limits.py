"""The documented upper bounds on every input that sizes an allocation, a loop or a read.

    from medfm.limits import INPUT_SIZE_MAX, check_at_most
    side = check_at_most(side, INPUT_SIZE_MAX, "--input-size")

Each bound is checked where its value enters (option parsing, API entry, spec load, image
decode), before anything is allocated, and a value past it is one line naming the option, the
value and the bound. The bounds sit well above any benchmark medfm is meant for (MedMNIST images
are at most 224 px; the largest published grid has a few thousand jobs) and well below what
takes a machine down. README "Guarantees" lists them.
"""

from __future__ import annotations

import numbers

from medfm.errors import InvalidArgumentError

SEED_MAX = 2**32 - 1  # every seed (sampling, training, corruption, import split): 0 .. 2^32 - 1,
#                       what numpy's legacy RandomState and torch.manual_seed both take
LIST_MAX = 1_000  # values in one list option once expanded: seeds (a range counts each seed),
#                   fractions, shots, severities
SHOTS_MAX = 100_000  # images per class in a few-shot subset
INPUT_SIZE_MAX = 1_024  # model input side in pixels (extract, finetune, grid)
BATCH_SIZE_MAX = 4_096  # images per forward or optimizer step
BATCH_PIXELS_MAX = 2**28  # batch size x input side^2: a float32 RGB batch of at most 3 GiB
LORA_RANK_MAX = 1_024  # LoRA adapter rank (a rank above a layer's width adapts nothing more)
EPOCHS_MAX = 10_000  # fine-tune epochs
ITERATIONS_MAX = 10_000_000  # fine-tune optimizer steps
WORKERS_MAX = 256  # decoding threads of an import, worker processes of a local grid
GRID_SPEC_BYTES_MAX = 1_048_576  # size of a grid spec file (1 MiB)
GRID_SPEC_DEPTH_MAX = 16  # nesting of lists and mappings in a grid spec (real specs use 3)
GRID_JOBS_MAX = 10_000  # jobs one `medfm grid` runs without --yes (`--dry-run` shows the count)
GRID_EXPANDED_MAX = 1_000_000  # jobs a grid spec may expand to at all (counted before expanding)
IMAGE_PIXELS_MAX = 89_478_485  # pixels of one imported image (about 9459 x 9459): Pillow's
#                                own decompression-bomb bound (PIL.Image.MAX_IMAGE_PIXELS)


def check_at_most(value: int, limit: int, what: str, *, minimum: int | None = None) -> int:
    """`value` as an int if it is an integer in `minimum`..`limit`, else one InvalidArgumentError
    naming `what` (an option or field), the value and the bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{what} must be a whole number; got {value!r}.")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(f"{what} must be at least {minimum}; got {value}.")
    if value > limit:
        raise InvalidArgumentError(f"{what} {value} is above medfm's limit of {limit:,} "
                                   f"(README, Guarantees); give a smaller value.")
    return int(value)


def check_seed(value: int, what: str = "seed") -> int:
    """A seed in 0 .. SEED_MAX (one range everywhere)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            0 <= value <= SEED_MAX):
        raise InvalidArgumentError(f"{what} must be a whole number in 0..{SEED_MAX} "
                                   f"(2^32 - 1); got {value!r}.")
    return int(value)


def check_list_length(count: int, what: str) -> None:
    """A list option expands to at most LIST_MAX values (checked before it is expanded)."""
    if count > LIST_MAX:
        raise InvalidArgumentError(f"{what} asks for {count:,} values, above medfm's limit of "
                                   f"{LIST_MAX:,} per list (README, Guarantees); give fewer.")


def check_batch_size(batch_size: int, input_size: int | None, what: str = "batch size") -> int:
    """A batch size in 1..BATCH_SIZE_MAX whose float32 RGB batch at `input_size` (when known)
    stays within BATCH_PIXELS_MAX pixels."""
    batch_size = check_at_most(batch_size, BATCH_SIZE_MAX, what, minimum=1)
    if input_size is not None and batch_size * input_size**2 > BATCH_PIXELS_MAX:
        raise InvalidArgumentError(
            f"{what} {batch_size} at input size {input_size} is {batch_size * input_size**2:,} "
            f"pixels per batch, above medfm's limit of {BATCH_PIXELS_MAX:,} (README, "
            f"Guarantees); give a batch of at most {BATCH_PIXELS_MAX // input_size**2}.")
    return batch_size
