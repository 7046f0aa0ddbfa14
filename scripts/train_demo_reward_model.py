"""Train nemolite's demo reward model: the demo model's decoder with a HelpSteer2-shaped regression head.

Nothing here needs a download. Questions are the demo model's own chat format ("What does X do?"
about a standard-library object); each gets five answers whose attributes are known by
construction:

    reference   the first paragraph of X's docstring       helpful, correct, coherent
    generated   the demo model's own sampled answer        fluent, mostly wrong
    off-topic   the docstring of another object             fluent, unhelpful for this question
    shuffled    the reference's words in random order       incoherent
    truncated   the reference's first few words             unfinished

complexity (long words) and verbosity (length) are measured from the text itself. The head is
fitted to the final hidden state of the last token (NeMo-Aligner's pooling) by ridge regression,
then the whole model is fine-tuned briefly with a mean-squared error. The first four outputs
(quality, toxicity, humor, creativity) stay untrained at zero, as in Nemotron-4-340B-Reward.

    python scripts/train_demo_reward_model.py --out nemolite/demo/reward_model   # ~36 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nemolite.checkpoint.hf import load_hf_model, save_hf_model  # noqa: E402
from nemolite.config import config_from_hf  # noqa: E402
from nemolite.demo import DEMO_MODEL_PATH  # noqa: E402
from nemolite.engine.llm import LLM  # noqa: E402
from nemolite.engine.sampling_params import SamplingParams  # noqa: E402
from nemolite.model import CausalLM  # noqa: E402
from nemolite.reward import ATTRIBUTES, DEFAULT_WEIGHTS, reward_model_hf_config, reward_token_ids  # noqa: E402
from nemolite.tokenizer import Tokenizer  # noqa: E402
from scripts.train_demo_model import QUESTION_FORMS, collect_documents  # noqa: E402

TRAINED = slice(4, 9)  # helpfulness, correctness, coherence, complexity, verbosity
# (helpfulness, correctness, coherence) of each kind of answer; complexity and verbosity are measured.
KIND_LABELS = {"reference": (4.0, 4.0, 4.0), "generated": (1.5, 1.0, 3.0), "off-topic": (0.5, 0.5, 3.0),
               "shuffled": (0.5, 0.5, 0.0), "truncated": (1.0, 2.0, 1.5)}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json")


def measured(answer: str) -> tuple[float, float]:
    """(complexity, verbosity) in [0, 4]: the share of long words, and the length in words."""
    words = answer.split()
    long_words = sum(len(w.strip(".,:;()'\"")) >= 9 for w in words) / max(1, len(words))
    return min(4.0, 16.0 * long_words), min(4.0, len(words) / 15.0)


def first_paragraph(doc: str, max_words: int = 60) -> str:
    return " ".join(doc.split("\n\n")[0].split()[:max_words])


def build_examples(documents, questions: list[str], generated: list[str],
                   rng: random.Random) -> list[tuple[int, list[dict], list[float], str]]:
    """(question index, conversation, nine target values, kind) for every answer of every question."""
    examples = []
    for index, ((_, _, doc), question, sampled) in enumerate(zip(documents, questions, generated)):
        reference = first_paragraph(doc)
        words = reference.split()
        other = first_paragraph(documents[(index + 1 + rng.randrange(len(documents) - 1)) % len(documents)][2])
        shuffled = words[:]
        rng.shuffle(shuffled)
        answers = {"reference": reference, "generated": sampled.strip(), "off-topic": other,
                   "shuffled": " ".join(shuffled), "truncated": " ".join(words[:rng.randint(2, 5)])}
        for kind, answer in answers.items():
            if not answer:
                continue
            labels = [0.0] * 4 + [*KIND_LABELS[kind], *measured(answer)]
            conversation = [{"role": "system", "content": ""}, {"role": "user", "content": question},
                            {"role": "assistant", "content": answer}]
            examples.append((index, conversation, labels, kind))
    return examples


def last_hidden(backbone, token_ids: list[int]) -> torch.Tensor:
    """The final-norm hidden state of the last token: [D]."""
    ids = torch.tensor([token_ids])
    return backbone(ids, torch.arange(len(token_ids))[None])[0, -1]


def evaluate(model: CausalLM, tokenized: list[list[int]], examples, weights: torch.Tensor) -> dict:
    """Mean squared error per trained attribute, and how often the weighted score ranks the reference
    answer above each worse kind of answer to the same question."""
    with torch.no_grad():
        rewards = torch.stack([model(torch.tensor([ids]), last_only=True)[0, -1] for ids in tokenized])
    targets = torch.tensor([labels for _, _, labels, _ in examples])
    mse = ((rewards - targets)[:, TRAINED] ** 2).mean(0)
    scores = rewards @ weights
    by_question: dict[int, dict[str, float]] = {}
    for (question, _, _, kind), score in zip(examples, scores.tolist()):
        by_question.setdefault(question, {})[kind] = score
    wins = {}
    for kind in ("generated", "off-topic", "shuffled", "truncated"):
        pairs = [q for q in by_question.values() if "reference" in q and kind in q]
        wins[kind] = sum(q["reference"] > q[kind] for q in pairs) / max(1, len(pairs))
    return {"mse": dict(zip(ATTRIBUTES[TRAINED], [round(v, 3) for v in mse.tolist()])),
            "reference_wins": {k: round(v, 3) for k, v in wins.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("nemolite/demo/reward_model"))
    parser.add_argument("--questions", type=int, default=1500)
    parser.add_argument("--held-out", type=int, default=300)
    parser.add_argument("--ridge", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.time()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    log_lines: list[str] = []

    def log(message: str) -> None:
        line = f"[{time.time() - started:6.0f} s] {message}"
        print(line, flush=True)
        log_lines.append(line)

    documents = collect_documents()
    rng.shuffle(documents)
    documents = documents[:args.questions + args.held_out]
    llm = LLM(None, dtype="float32", device="cpu")
    questions = [rng.choice(QUESTION_FORMS).format(name=name) for name, _, _ in documents]
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=60, seed=args.seed * 100_003 + i)
              for i in range(len(questions))]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
    outputs = llm.generate(prompts, [llm.chat_params(p) for p in params])
    generated = [output.outputs[0].text for output in outputs]
    del llm
    log(f"{len(documents)} questions, the demo model's answers sampled")

    examples = build_examples(documents, questions, generated, rng)
    train = [e for e in examples if e[0] < args.questions]
    test = [e for e in examples if e[0] >= args.questions]

    base = load_hf_model(DEMO_MODEL_PATH, dtype="float32", device="cpu")
    hf_config = reward_model_hf_config(json.loads((DEMO_MODEL_PATH / "config.json").read_text()), len(ATTRIBUTES))
    model = CausalLM(config_from_hf(hf_config))
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert set(missing) == {"score.weight", "score.bias"} and set(unexpected) == {"lm_head.weight"}, (missing, unexpected)
    del base
    tokenizer = Tokenizer.from_pretrained(DEMO_MODEL_PATH, model_type="nemotron", bos_token_id=2, eos_token_ids=[3])
    encode = [reward_token_ids(tokenizer, c) for _, c, _, _ in train]
    encode_test = [reward_token_ids(tokenizer, c) for _, c, _, _ in test]
    log(f"{len(train)} training answers, {len(test)} held out "
        f"(longest {max(map(len, encode + encode_test))} tokens)")

    # 1. Ridge regression of the trained attributes on the frozen backbone's pooled hidden state.
    with torch.no_grad():
        features = torch.stack([last_hidden(model.model, ids) for ids in encode]).double()
    targets = torch.tensor([labels for _, _, labels, _ in train], dtype=torch.float64)
    design = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], 1)
    gram = design.T @ design + args.ridge * torch.eye(design.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, design.T @ targets[:, TRAINED])  # [D + 1, 5]
    with torch.no_grad():
        model.score.weight.zero_()
        model.score.bias.zero_()
        model.score.weight[TRAINED] = solution[:-1].T.float()
        model.score.bias[TRAINED] = solution[-1].float()
    weights = torch.tensor(DEFAULT_WEIGHTS)
    model.eval()
    log(f"ridge head, held out: {evaluate(model, encode_test, test, weights)}")

    # 2. Fine-tune everything (the untrained rows of the head stay zero).
    optimizer = torch.optim.AdamW([p for p in model.parameters()], lr=args.lr, weight_decay=0.0)
    generator = random.Random(args.seed + 1)
    model.train()
    for step in range(args.steps):
        picks = [generator.randrange(len(train)) for _ in range(args.batch)]
        loss = 0.0
        for index in picks:
            reward = model(torch.tensor([encode[index]]), last_only=True)[0, -1]
            loss = loss + ((reward - targets[index].float())[TRAINED] ** 2).mean()
        loss = loss / args.batch
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.score.weight.grad[:4] = 0
        model.score.bias.grad[:4] = 0
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0:
            log(f"step {step + 1}: loss {loss.item():.3f}")
    model.eval()
    result = evaluate(model, encode_test, test, weights)
    log(f"fine-tuned, held out: {result}")

    args.out.mkdir(parents=True, exist_ok=True)
    save_hf_model(model, args.out, {**hf_config, "dtype": "bfloat16"}, dtype=torch.bfloat16)
    state = model.state_dict()  # the head stays float32 on disk, as NeMo-Aligner keeps it
    from safetensors.torch import load_file, save_file

    saved = load_file(str(args.out / "model.safetensors"))
    saved.update({name: state[name].float().contiguous() for name in ("score.weight", "score.bias")})
    save_file(saved, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        if (DEMO_MODEL_PATH / name).is_file():
            shutil.copy(DEMO_MODEL_PATH / name, args.out / name)
    (args.out / "training.log").write_text("\n".join(log_lines) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
