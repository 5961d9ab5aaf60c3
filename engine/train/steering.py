"""What steers the base model when it writes its own user turns (``magpie.py``): per request a kind,
a system prompt naming a domain, a persona and a length, and sometimes the first words of the user
message (an opener the model continues). Small models follow a system prompt loosely; an opener
pins the kind.

The lists are written for this purpose and are unrelated to the hand-written evaluation prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# share of each kind among the generated conversations
KIND_WEIGHTS = {"chat": 0.35, "code": 0.25, "math": 0.14, "json": 0.13, "rewrite": 0.13}
# share of the seeds of each kind that carry an opener: the model follows a system prompt's kind
# well for questions and code, rarely for JSON or rewriting requests (seen in a small run)
OPENER_SHARE = {"chat": 0.4, "code": 0.55, "math": 0.6, "json": 0.85, "rewrite": 0.9}
FOLLOW_UP_OPENERS = (
    "", "", "", "Thanks!", "Can you", "Why", "What about", "Could you make it", "How would I",
    "Great, now", "I don't understand", "Can you give me an example of", "Is there a way to",
)

TOPICS = (
    "cooking", "baking bread", "gardening", "houseplants", "personal finance", "saving money",
    "budgeting", "job interviews", "writing a resume", "studying for exams", "learning a language",
    "travel planning", "packing for a trip", "fitness", "running", "sleep", "healthy eating",
    "meal prep", "time management", "productivity", "stress", "friendship", "parenting",
    "pets", "dog training", "cats", "home repair", "cleaning", "moving to a new city", "renting",
    "cars", "bicycles", "photography", "music", "learning guitar", "movies", "books", "history",
    "ancient Rome", "world war two", "geography", "astronomy", "the solar system", "weather",
    "climate", "oceans", "animals", "birds", "insects", "dinosaurs", "chemistry", "physics",
    "biology", "the human body", "medicine", "first aid", "psychology", "philosophy", "economics",
    "inflation", "small business", "marketing", "email etiquette", "public speaking",
    "negotiation", "teamwork", "remote work", "video games", "board games", "chess", "soccer",
    "basketball", "the olympics", "art", "painting", "drawing", "poetry", "creative writing",
    "smartphones", "computers", "the internet", "online privacy", "passwords", "social media",
    "electricity", "energy saving", "recycling", "coffee", "tea", "wine", "holidays",
    "birthday parties", "weddings", "gifts", "fashion", "skin care", "hair care", "fishing",
    "camping", "hiking", "mountains", "islands", "volcanoes", "earthquakes", "mathematics",
    "statistics", "probability", "grammar", "etymology", "mythology", "religions of the world",
)

PERSONAS = (
    "high school student", "college student", "retired teacher", "software engineer",
    "new programmer", "small business owner", "nurse", "parent of two young children",
    "graduate student in biology", "data analyst", "curious ten-year-old", "chef",
    "freelance writer", "marketing manager", "mechanic", "farmer", "traveler", "musician",
    "personal trainer", "office worker", "web developer", "system administrator",
    "non-native English speaker", "journalist", "lawyer", "accountant", "artist", "librarian",
)

LENGTHS = (
    "a short, one-sentence message",
    "a short question",
    "a message of two or three sentences with some context",
    "a detailed request with specific requirements",
)

LANGUAGES = (
    "Python", "Python", "Python", "JavaScript", "JavaScript", "TypeScript", "Java", "C", "C++",
    "C#", "Go", "Rust", "SQL", "Bash", "Ruby", "PHP", "Kotlin", "Swift", "HTML and CSS", "R",
)

DOMAINS = {
    "chat": (
        "You answer everyday questions about {topic}.",
        "You give practical advice about {topic}.",
        "You explain how things work, especially {topic}.",
        "You are a friendly assistant people chat with about {topic}.",
        "You help people make decisions about {topic}.",
    ),
    "code": (
        "You help people write {lang} code.",
        "You find and fix bugs in {lang} programs.",
        "You explain {lang} concepts and code to learners.",
        "You are an expert {lang} programmer who writes small, correct functions.",
    ),
    "math": (
        "You solve math word problems step by step.",
        "You help students with arithmetic, fractions, percentages and algebra.",
        "You solve everyday math problems about money, time, distance and recipes.",
    ),
    "json": (
        "You turn requests into JSON objects and lists.",
        "You answer with structured data: JSON, numbered lists or tables about {topic}.",
        "You extract information from text and return it as JSON.",
    ),
    "rewrite": (
        "You rewrite, shorten, summarize and proofread texts the user pastes.",
        "You help people improve the wording of their emails and messages about {topic}.",
        "You summarize paragraphs and articles about {topic}.",
    ),
}

OPENERS = {
    "chat": (
        "Why do", "How does", "What is the difference between", "Can you explain", "What are",
        "Is it true that", "How can I", "What should I do if", "Any tips for", "I'm trying to",
        "Why is", "What's the best way to", "How long does it take to", "Should I",
    ),
    "code": (
        "Write a {lang} function that", "How do I", "Can you explain what this {lang} code does",
        "Why does my {lang} code", "What is the difference between", "Write a {lang} program that",
        "Fix this {lang} code:", "How can I read a file in {lang}", "Write a {lang} class for",
        "What's the best way to", "Implement", "Show me how to",
    ),
    "math": (
        "A store sells", "If a train", "Tom has", "What is", "Solve for x:", "How many",
        "A recipe needs", "I earn", "A rectangle has", "Calculate", "Maria bought",
        "The price of", "A car travels",
    ),
    "json": (
        "Give me a JSON object with", "Return a JSON array of", "Convert this to JSON:",
        "List five", "Make a list of", "Create a JSON schema for", "Output a JSON object that",
        "Give me a numbered list of", "Extract the names and dates from this text as JSON:",
    ),
    "rewrite": (
        "Rewrite this sentence to sound more professional:", "Summarize this paragraph:",
        "Make this email shorter:", "Fix the grammar in this text:", "Paraphrase:",
        "Can you make this more polite:", "Summarize in one sentence:",
        "Rewrite this for a five-year-old:", "Turn these notes into a short paragraph:",
    ),
}


@dataclass(frozen=True)
class Seed:
    kind: str
    system: str
    opener: str  # the first words of the user message ("" none)


def _pick(rng: random.Random, options) -> str:
    return options[rng.randrange(len(options))]


def make_seed(rng: random.Random) -> Seed:
    """One steering seed drawn with ``rng``."""
    kinds = list(KIND_WEIGHTS)
    kind = rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
    fill = {"topic": _pick(rng, TOPICS), "lang": _pick(rng, LANGUAGES)}
    domain = _pick(rng, DOMAINS[kind]).format(**fill)
    persona = _pick(rng, PERSONAS)
    length = _pick(rng, LENGTHS)
    system = (f"You are a helpful AI assistant. {domain} "
              f"The user is a {persona} and writes {length}.")
    opener = ""
    if rng.random() < OPENER_SHARE[kind]:
        opener = _pick(rng, OPENERS[kind]).format(**fill)
    return Seed(kind, system, opener)


def follow_up_opener(rng: random.Random) -> str:
    return _pick(rng, FOLLOW_UP_OPENERS)
