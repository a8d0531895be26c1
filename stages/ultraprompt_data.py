"""UltraPrompt / P-Aligner principles and prompts, in our own words.

The principle set (names and domains) follows P-Aligner (arXiv 2508.04626; official code
F2-Song/P-Aligner, `online_synthesis/rules/rule_P-Aligner.json`): Helpfulness applies to every
seed, the other four domains add their own principles. Every text below is our wording; the
reference's texts are not copied.

A principle is an ACTION of the search: "rewrite the request by <how>". `how` completes the
sentence "Rewrite the request by ...".
"""

from __future__ import annotations

from typing import NamedTuple


class Principle(NamedTuple):
    name: str
    domain: str
    how: str  # completes "Rewrite the request by ..."


HELPFULNESS = "Helpfulness"
# Categories a seed can have (the tagger's labels); "other" gets Helpfulness only.
CATEGORIES = ("Math", "Coding & Debugging", "Honesty", "Harmlessness", "other")

PRINCIPLES: tuple[Principle, ...] = (
    Principle("clarification request", HELPFULNESS,
              "stating plainly what the user wants and what a complete answer should contain, so the assistant "
              "knows exactly what to deliver"),
    Principle("information augmentation", HELPFULNESS,
              "adding useful context the request leaves implicit (background, purpose, constraints, the level of "
              "detail wanted) without changing what is being asked"),
    Principle("tone improvement", HELPFULNESS,
              "phrasing it in a courteous, friendly and sincere way, as a considerate person would ask"),
    Principle("factuality enhancement", "Honesty",
              "asking the assistant to stick to verifiable facts, say when it is unsure, and not invent sources "
              "or details"),
    Principle("safe intent declaration", "Harmlessness",
              "opening with a short note that the answer should be respectful, lawful and free of harmful or "
              "unethical content"),
    Principle("boundary enforcement", "Harmlessness",
              "adding an explicit instruction to politely decline any part that would violate privacy, safety "
              "or ethics, and to help with the rest"),
    Principle("error simulation", "Coding & Debugging",
              "asking the assistant to think about likely bugs, edge cases and invalid inputs related to the task"),
    Principle("debugging guidance", "Coding & Debugging",
              "asking for step-by-step reasoning about the code: how to locate the problem, why it happens and "
              "how to verify the fix"),
    Principle("hint addition", "Math",
              "adding a hint, a worked example or a suggested first step that makes the problem easier to "
              "approach, without giving away the answer"),
    Principle("solution verification", "Math",
              "asking the assistant to show its reasoning and check its final answer before giving it"),
)

BY_NAME = {p.name: p for p in PRINCIPLES}


def canonical_category(value: str | None) -> str | None:
    """A seed's category as one of CATEGORIES (case-insensitive; Magpie's "coding & debugging" and
    "math" map too); None when empty. Anything else is "other" (Helpfulness only, as the reference)."""
    if value is None or not str(value).strip():
        return None
    folded = str(value).strip().casefold()
    for category in CATEGORIES:
        if category.casefold() == folded:
            return category
    return "other"


def actions_for(category: str | None) -> tuple[str, ...]:
    """The seed's action set: Helpfulness's principles, then its category's (3..5 names)."""
    domain = canonical_category(category)
    return tuple(p.name for p in PRINCIPLES if p.domain == HELPFULNESS) + \
        tuple(p.name for p in PRINCIPLES if domain not in (None, "other") and p.domain == domain)


# ---------------------------------------------------------------- prompts (our wording)

REWRITE_SYSTEM = ("You edit requests that users send to an AI assistant so that they get better answers. You never "
                  "answer a request yourself; you only return an improved version of it.")
REWRITE_USER = ("Here is a user's request to an AI assistant:\n<request>\n{instruction}\n</request>\n\n"
                "Rewrite the request by {how}. Keep the user's goal and every detail they gave. Do not answer it. "
                "{reply}")
# How the rewriter is told to reply, by `rewrite_format` (json: the engine enforces REWRITE_SCHEMA).
REWRITE_REPLY = {
    "json": 'Reply with a JSON object whose only key "request" holds the rewritten request.',
    "text": "Reply with the rewritten request only: no title, no quotes, no explanation.",
}
REWRITE_SCHEMA = {"type": "object", "properties": {"request": {"type": "string", "minLength": 1}},
                  "required": ["request"], "additionalProperties": False}

# The optimiser's task in the published data (prompt of the pairs / SFT rows).
OPTIMISER_REQUEST = ("You improve prompts for AI assistants. Rewrite the prompt below so that an assistant will give "
                     "a more helpful, accurate and safe answer to what the user actually wants. Return only the "
                     "improved prompt.\n\n<prompt>\n{instruction}\n</prompt>")
# The single-step optimiser's task (the `steps` config): one principle applied to one prompt.
STEP_REQUEST = ("You improve prompts for AI assistants. Rewrite the prompt below by {how}. Return only the "
                "improved prompt.\n\n<prompt>\n{instruction}\n</prompt>")

CATEGORY_SYSTEM = "You sort requests to an AI assistant into domains. Answer with exactly one of the allowed labels."
CATEGORY_USER = ("Which domain does this request mainly belong to?\n\n<request>\n{instruction}\n</request>\n\n"
                 "Math: calculations, equations, proofs, word problems.\n"
                 "Coding & Debugging: writing, explaining, reviewing or fixing code.\n"
                 "Honesty: questions of fact where accuracy matters (history, science, health, news, people).\n"
                 "Harmlessness: anything that touches on danger, crime, privacy, hate or unethical behaviour.\n"
                 "other: everything else.\n\nAllowed labels: Math, Coding & Debugging, Honesty, Harmlessness, other."
                 "\nLabel:")
