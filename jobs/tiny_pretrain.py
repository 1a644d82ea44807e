"""How ``tunefleet/tiny-llama``'s shipped weights were made: a short full-parameter pre-training.

    python -m jobs.tiny --pretrain [--out FILE] [--steps N] [--seed S]

Why: a random tiny base gives LoRA nothing to adapt (the demo's loss barely moved). This teaches
the same architecture (2 layers, hidden 64, byte tokenizer) to model plain text first: bytes,
words, casing, a few facts. The corpus is generated here, from word lists and a fixed seed, and is
general text, *not* the demo's Alpaca prompt format, so the demo's fine-tune still has something
to learn (the format, and to answer with just the answer).

Deterministic on one machine (one torch thread, fixed seeds, fp32), but float results may differ
across CPUs, so the weights are shipped in ``jobs/assets`` rather than re-made at first use; see
``jobs.tiny`` for the recipe the shipped file came from and its figures.

What the demo gets from it (examples/qlora-tiny.yaml): the fine-tune's train loss falls ~80 %
and its eval loss ~50 %, and ``tunefleet eval`` answers in the data's shapes (upper-case words,
backwards-looking words, numbers, capital cities). It does not learn to *copy*: the answers are
the right kind, not the right word. A copy mechanism (induction heads) did form in this model
with ~1700 steps of pure copy text, but did not survive a mixed corpus nor a 4-bit LoRA fine-tune
at lr 1e-2 within the time budget (under ~2 minutes), so the recipe does not try for it.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# --- the corpus ----------------------------------------------------------------------------------

NOUNS = """
anchor apple arrow badge basket beacon bell blanket boat bottle bridge brush bucket button cabin
cactus cake camera candle canyon carpet castle cat chair cherry circle cloud clock coat comet
copper cottage crown cup curtain desk diamond dog door dragon drum eagle engine feather fence
field flag flower forest fork fountain fox frog garden gate giraffe glass glove goat grape guitar
hammer harbor hat helmet hill honey horse island jacket jar jungle kettle key kitten ladder lamp
lantern leaf lemon letter lion lizard magnet map marble meadow mirror monkey moon mountain
mushroom needle nest ocean onion orange owl paddle paper parrot peach pear pencil pepper piano
pillow planet plate pocket pond potato puzzle quartz rabbit radio rain ribbon ring river road
robot rocket rope saddle sail salt sand scarf seed shadow shell ship shoe silver snake snow sock
spoon star stone storm street sugar summer sun table teapot ticket tiger tomato tower train tree
tunnel turtle umbrella valley vase velvet violin wagon wallet water whale wheel window winter
wolf yarn zebra zipper bread cheese kernel pebble canvas compass falcon orchard meteor walnut
""".split()  # noqa: SIM905 - word lists read better as text

ADJECTIVES = """
red blue green yellow violet orange purple black white silver golden brown pink gray small big
tiny huge tall short long round square quiet loud happy sad brave calm clever gentle quick slow
bright dark soft hard warm cold old young new ancient fresh sweet bitter heavy light smooth rough
""".split()  # noqa: SIM905 - word lists read better as text

VERBS = """
sees finds likes carries paints builds moves opens holds watches follows pushes pulls washes
draws cleans fixes sells buys hides keeps brings throws catches
""".split()  # noqa: SIM905 - word lists read better as text

PLACES = """
garden kitchen forest harbor market village castle river valley station library school park
field island tower bridge meadow
""".split()  # noqa: SIM905 - word lists read better as text

NAMES = "Anna Ben Clara David Emma Felix Grace Henry Iris Jack Kate Leo Mia Noah Olga Paul Rosa Sam Tara Victor".split()  # noqa: SIM905

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Brazil": "Brasilia",
    "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi", "Australia": "Canberra",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Mexico": "Mexico City", "Peru": "Lima", "Chile": "Santiago",
    "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest", "Thailand": "Bangkok",
    "Vietnam": "Hanoi", "Morocco": "Rabat", "Cuba": "Havana", "Russia": "Moscow", "Denmark": "Copenhagen",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Switzerland": "Bern", "Iceland": "Reykjavik",
    "Colombia": "Bogota", "Nigeria": "Abuja", "Ghana": "Accra", "Korea": "Seoul",
}

# what share of the corpus lines each kind of sentence is
KINDS = ["prose", "repeat", "capital", "upper", "reverse", "arithmetic", "count"]
KIND_WEIGHTS = [2, 1, 1, 2, 2, 2, 1]

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()  # noqa: SIM905


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(NOUNS + ADJECTIVES) for _ in range(n))


def _sentence(rng: random.Random) -> str:
    """One line of plain text: prose, a fact, casing, spelling backwards, arithmetic, counting."""
    n, a, v, p, who = rng.choice(NOUNS), rng.choice(ADJECTIVES), rng.choice(VERBS), rng.choice(PLACES), rng.choice(NAMES)
    n2, a2 = rng.choice(NOUNS), rng.choice(ADJECTIVES)
    kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    if kind == "prose":
        return rng.choice([
            f"The {a} {n} {v} the {a2} {n2}.",
            f"{who} {v} a {a} {n} in the {p}.",
            f"A {n} is {a}, but the {n2} is {a2}.",
            f"In the {p} there is a {a} {n} and a {n2}.",
            f"{who} has a {a} {n}. It is very {a2}.",
            f"Every {n} in the {p} is {a}.",
            f"The {n} was {a} and the {n2} was {a2}.",
        ])
    if kind == "repeat":
        text = rng.choice([n, f"{a} {n}", _words(rng, rng.randint(2, 4))])
        return rng.choice([
            f"{who} said {text}, and then {text} again.",
            f"{text}! {text}! shouted {who}.",
            f"The sign read {text}. Under it, someone had written {text}.",
        ])
    if kind == "capital":
        country = rng.choice(list(CAPITALS))
        city = CAPITALS[country]
        return rng.choice([
            f"{city} is the capital of {country}.",
            f"The capital of {country} is {city}.",
            f"{who} lives in {city}, the capital of {country}.",
        ])
    if kind == "upper":
        text = rng.choice([n, n, f"{a} {n}", _words(rng, rng.randint(2, 3))])
        return rng.choice([
            f"{text} in capitals is {text.upper()}.",
            f"Written in upper case, {text} is {text.upper()}.",
            f"{text.upper()} is {text} in capital letters.",
            f"{who} wrote {text.upper()} on the {n2}.",
        ])
    if kind == "reverse":
        text = rng.choice([n, n, n, f"{a} {n}"])
        return rng.choice([
            f"{text} spelled backwards is {text[::-1]}.",
            f"Backwards, {text} reads {text[::-1]}.",
            f"{text[::-1]} is {text} written backwards.",
        ])
    if kind == "arithmetic":
        x, y = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.randrange(3)
        if op == 0:
            return rng.choice([f"{x} plus {y} is {x + y}.", f"{x} + {y} = {x + y}", f"Adding {y} to {x} gives {x + y}."])
        if op == 1:
            x, y = max(x, y), min(x, y)
            return rng.choice([f"{x} minus {y} is {x - y}.", f"{x} - {y} = {x - y}", f"Taking {y} from {x} leaves {x - y}."])
        return rng.choice([f"{x} times {y} is {x * y}.", f"{x} * {y} = {x * y}", f"{x} multiplied by {y} makes {x * y}."])
    word = rng.choice(NOUNS)
    letter = rng.choice(sorted(set(word)))
    k = word.count(letter)
    return rng.choice([
        f"The word {word} has {len(word)} letters.",
        f"There {'is' if k == 1 else 'are'} {k} {letter} in {word}.",
        f"{word} has {NUMBER_WORDS[len(word)] if len(word) < len(NUMBER_WORDS) else len(word)} letters.",
    ])


def corpus_lines(seed: int) -> Iterator[str]:
    """An endless, deterministic stream of corpus lines (one sentence or two a line)."""
    rng = random.Random(seed)
    while True:
        k = 1 if rng.random() < 0.6 else 2
        yield " ".join(_sentence(rng) for _ in range(k))


def token_stream(tokenizer, seed: int) -> Iterator[int]:
    """Corpus lines as ``<s> line </s>`` token ids, back to back."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    lines = corpus_lines(seed)
    while True:
        batch = [next(lines) for _ in range(256)]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            yield bos
            yield from ids
            yield eos


def batches(tokenizer, seed: int, batch_size: int, seq_len: int) -> Iterator[torch.Tensor]:
    import torch

    stream = token_stream(tokenizer, seed)
    while True:
        flat = [next(stream) for _ in range(batch_size * seq_len)]
        yield torch.tensor(flat, dtype=torch.long).view(batch_size, seq_len)


# --- the training ---------------------------------------------------------------------------------

DEFAULT_STEPS = 2000
DEFAULT_SEED = 1
HELDOUT_SEED = 10_000  # corpus lines the pre-training never saw
BATCH_SIZE = 16
SEQ_LEN = 128
PEAK_LR = 3e-3
WARMUP = 100


def heldout_loss(model, tokenizer, batches_n: int = 8) -> float:
    """Mean next-token loss (nats) on held-out corpus text."""
    import torch

    it = batches(tokenizer, HELDOUT_SEED, BATCH_SIZE, SEQ_LEN)
    model.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(batches_n):
            x = next(it)
            total += float(model(input_ids=x, labels=x).loss)
    model.train()
    return total / batches_n


def pretrain(steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED, log_every: int = 100, say=print):
    """(model, figures): the tiny model pre-trained from its fixed-seed init for ``steps`` steps."""
    import torch

    from jobs.tiny import build_model, build_tokenizer

    threads, rng_state = torch.get_num_threads(), torch.random.get_rng_state()
    torch.set_num_threads(1)
    try:
        tokenizer = build_tokenizer()
        model = build_model().float()
        model.train()
        torch.manual_seed(seed)  # nothing draws from it today (no dropout); pinned all the same
        opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.98), weight_decay=0.01)

        def lr_at(step: int) -> float:
            if step < WARMUP:
                return PEAK_LR * (step + 1) / WARMUP
            done = (step - WARMUP) / max(1, steps - WARMUP)
            return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))

        data = batches(tokenizer, seed, BATCH_SIZE, SEQ_LEN)
        t0 = time.monotonic()
        first = last = None
        window: list[float] = []
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            x = next(data)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            value = loss.item()
            first = value if first is None else first
            window.append(value)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                last = sum(window) / len(window)
                say(f"step {step + 1}/{steps}  loss {last:.4f}  ({time.monotonic() - t0:.0f} s)")
                window = []
        model.eval()
        figures = {
            "steps": steps, "seed": seed, "first_loss": first, "final_loss": last,
            "heldout_loss": heldout_loss(model, tokenizer), "seconds": round(time.monotonic() - t0, 1),
        }
        return model, figures
    finally:
        torch.set_num_threads(threads)
        torch.random.set_rng_state(rng_state)


def save_weights(model, out: Path) -> str:
    """Write the model's state as one fp32 safetensors file; returns its sha256."""
    import hashlib

    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return hashlib.sha256(out.read_bytes()).hexdigest()
