"""Seeded synthetic instruction data with answers that can be checked.

Each example is an instruction (``prompt``) and a templated answer made of
*parts*: short independent sentences, one per fact given in the prompt, plus,
in a fifth of the examples (one at a random place in every block of five), a
closing part that depends on the earlier ones (a comparison, a total, a count
or a summary), which the prompt asks for. The parts map directly onto the
spans of a planned-diffusion response: ``topic`` names the span, ``depends``
marks the part that must wait behind a ``<sync/>``. The topic of an independent
part is the words the prompt uses for its fact (``Favourite color`` for the line
``Favourite color: pink``, ``Day 2``, ``Paris``, ``flour``), so writing a plan
is copying from the prompt, not paraphrasing it; a closing part's topic
(``summary``, ``total price``) comes from the instruction that asks for it.

Every example is a JSON-serialisable dict::

    {"id": "train-000123", "split": "train", "family": "profile",
     "prompt": "...", "response": "...",
     "parts": [{"topic": "Name", "text": "...", "depends": False}, ...],
     "answer_keys": ["Ann Lee", "31", "Paris", ...]}

with ``response == "\\n".join(p["text"] for p in parts)`` and every answer key
an exact substring of ``response`` (:func:`fact_accuracy` scores a generated
response against them).

Determinism and disjointness:
    Each split draws from its own ``random.Random`` whose seed is derived from
    ``(seed, split)`` with SHA-256 (never ``hash()`` or the global generator),
    so the same arguments give identical bytes. Each prompt is also assigned to
    exactly one split by a BLAKE2 hash of its text; a split keeps only the
    candidates assigned to it (and no duplicates), so no validation or test
    prompt can appear in train, whatever the sizes or seed.

Vocabulary:
    All names and values come from the fixed word lists below, so with the
    default sizes every word of the validation and test sets also occurs in
    train. Proper nouns are capitalised, everything else is lowercase.

Run ``python -m pdlightning.data.synthetic --out DIR`` to write
``DIR/{train,validation,test}.jsonl``. Pure Python: no torch, no Lightning.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 6000, "validation": 200, "test": 200}
DEPENDS_BLOCK = 5
"""Exactly one example in each block of this many (at a random place) ends with a depends part."""

MIN_PARTS, MAX_PARTS = 2, 8
MIN_PART_TOKENS, MAX_PART_TOKENS = 5, 60
MIN_ANSWER_TOKENS, MAX_ANSWER_TOKENS = 30, 250

# Out of 20 hash buckets of a prompt: which belong to which split (10% / 10% / 80%).
_SPLIT_BUCKETS = {"test": range(0, 2), "validation": range(2, 4), "train": range(4, 20)}
_N_BUCKETS = 20

# ---------------------------------------------------------------------------
# Word lists
# ---------------------------------------------------------------------------

FIRST_NAMES = (
    "Ann", "Maria", "Lucy", "Emma", "Sara", "Nina", "Julia", "Clara", "Alice", "Rosa",
    "Eva", "Laura", "Mia", "Hannah", "Olivia", "Grace", "Lily", "Zoe", "Ada", "Ines",
    "Tom", "Ben", "Sam", "Leo", "Paul", "Omar", "Ivan", "Hugo", "Jack", "Noah",
    "Luca", "Adam", "Felix", "Oscar", "Ravi", "Kenji", "Diego", "Peter", "Victor", "Amir",
)
LAST_NAMES = (
    "Lee", "Smith", "Brown", "Garcia", "Novak", "Kim", "Silva", "Rossi", "Weber", "Khan",
    "Costa", "Berg", "Moreau", "Tanaka", "Fischer", "Lopez", "Young", "Clark", "Walsh", "Park",
    "Dubois", "Olsen", "Meyer", "Ward",
)
CITIES = (
    "Paris", "Rome", "Oslo", "Berlin", "Madrid", "Lisbon", "Vienna", "Prague", "Dublin", "London",
    "Tokyo", "Seoul", "Cairo", "Lima", "Quito", "Boston", "Denver", "Toronto", "Sydney", "Delhi",
    "Nairobi", "Athens", "Warsaw", "Helsinki", "Zurich", "Geneva", "Milan", "Porto", "Kyoto",
    "Osaka", "Bogota", "Havana", "Chicago", "Dallas", "Austin", "Miami", "Seattle", "Montreal",
    "Manila", "Hanoi",
)
JOBS = (
    "baker", "teacher", "nurse", "doctor", "farmer", "pilot", "driver", "writer", "painter",
    "engineer", "architect", "chef", "lawyer", "dentist", "plumber", "gardener", "librarian",
    "musician", "tailor", "carpenter", "actor", "singer", "banker", "editor", "designer",
    "mechanic", "artist", "electrician",
)
HOBBIES = (
    "chess", "painting", "hiking", "reading", "cycling", "swimming", "cooking", "gardening",
    "dancing", "fishing", "running", "knitting", "singing", "drawing", "climbing", "skating",
    "sailing", "baking", "photography", "tennis",
)
PETS = ("dog", "cat", "rabbit", "parrot", "turtle", "hamster", "goldfish", "horse")
PET_NAMES = ("Bella", "Coco", "Rex", "Luna", "Milo", "Daisy", "Buddy", "Kiki", "Rocky", "Pip", "Toby")
COLORS = (
    "red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown",
    "gray", "silver",
)
LANGUAGES = (
    "English", "French", "Spanish", "German", "Italian", "Polish", "Greek", "Arabic", "Hindi",
    "Japanese", "Korean", "Dutch", "Swedish", "Portuguese", "Turkish",
)
FOODS = (
    "soup", "pasta", "rice", "pizza", "bread", "salad", "fish", "noodles", "curry", "tacos",
    "cheese", "pancakes", "dumplings",
)
BRANDS = (
    "Nova", "Lumo", "Aero", "Zenta", "Orbit", "Vela", "Pico", "Terra", "Kora", "Flux",
    "Brio", "Solis", "Mira", "Onyx", "Polar", "Juno",
)
PRODUCT_TYPES = (
    "lamp", "backpack", "kettle", "chair", "desk", "speaker", "bottle", "jacket", "blender",
    "clock", "camera", "helmet", "tent", "radio", "fan", "heater", "mug", "bike", "scooter",
    "watch",
)
MATERIALS = (
    "steel", "wood", "plastic", "glass", "leather", "cotton", "aluminum", "bamboo", "wool",
    "ceramic", "canvas", "rubber",
)
USES = ("camping", "travel", "work", "school", "sports", "cooking", "reading", "hiking", "home use")
PLACES = (
    "the museum", "the old town", "the harbor", "the park", "the castle", "the market",
    "the zoo", "the cathedral", "the beach", "the gallery", "the river", "the gardens",
    "the tower", "the palace", "the library", "the bridge",
)
TASKS = (
    "fix a bike", "paint a room", "plant a tree", "clean a kitchen", "pack a suitcase",
    "build a shelf", "wash a car", "set up a tent", "repair a chair", "move a desk",
    "tidy a garage", "hang a picture",
)
VERBS = (
    "clean", "check", "open", "close", "fill", "empty", "cut", "fold", "paint", "measure",
    "sort", "pack", "label", "wash", "dry", "move", "lift", "mark", "sand", "tape", "remove",
    "cover", "sweep", "fix",
)
OBJECTS = (
    "the walls", "the frame", "the door", "the lid", "the chain", "the box", "the shelf",
    "the floor", "the window", "the table", "the pipe", "the tires", "the tray", "the bag",
    "the board", "the edges", "the screws", "the cables",
)
DISHES = (
    "lemon cake", "tomato soup", "rice salad", "apple pie", "banana bread", "vegetable curry",
    "chicken stew", "bean chili", "carrot cake", "fruit salad", "pasta bake", "onion tart",
)
# name (also the topic), unit kind, preparations that make sense for it.
INGREDIENTS = (
    ("flour", "cup", ("sifted", "fresh", "dry")),
    ("sugar", "gram", ("fine", "brown", "dry")),
    ("butter", "gram", ("melted", "soft", "cold")),
    ("milk", "cup", ("warm", "cold", "fresh")),
    ("eggs", "count", ("beaten", "fresh", "whole")),
    ("salt", "teaspoon", ("fine", "coarse", "dry")),
    ("water", "cup", ("warm", "cold", "boiling")),
    ("rice", "cup", ("washed", "dry", "cooked")),
    ("olive oil", "spoon", ("warm", "fresh", "cold")),
    ("honey", "spoon", ("warm", "fresh", "soft")),
    ("lemons", "count", ("sliced", "fresh", "whole")),
    ("apples", "count", ("sliced", "chopped", "grated")),
    ("tomatoes", "count", ("chopped", "sliced", "fresh")),
    ("onions", "count", ("chopped", "sliced", "grated")),
    ("carrots", "count", ("grated", "chopped", "sliced")),
    ("garlic", "clove", ("chopped", "crushed", "whole")),
    ("cheese", "gram", ("grated", "sliced", "soft")),
    ("beans", "cup", ("cooked", "dry", "washed")),
    ("yogurt", "cup", ("cold", "fresh", "whole")),
    ("oats", "cup", ("dry", "ground", "whole")),
    ("pepper", "teaspoon", ("ground", "fresh", "coarse")),
    ("cinnamon", "teaspoon", ("ground", "fine", "fresh")),
    ("chicken", "gram", ("chopped", "cooked", "sliced")),
)
CITY_COUNTS = (
    "parks", "museums", "bridges", "schools", "hospitals", "libraries", "theaters", "markets",
    "stadiums",
)
SHOP_ITEMS = (
    "lamp", "book", "shirt", "umbrella", "pen", "notebook", "candle", "towel", "plant", "hat",
    "scarf", "mug", "clock", "blanket", "wallet", "kettle", "pillow", "belt",
)
SHOPS = ("market", "mall", "bakery", "bookstore", "supermarket", "kiosk", "pharmacy", "outlet")
ANIMALS = (
    "fox", "owl", "wolf", "bear", "deer", "otter", "eagle", "rabbit", "badger", "beaver", "goat",
    "horse", "camel", "zebra", "lion", "tiger", "panda", "koala", "seal", "moose",
)
HABITATS = (
    "forest", "desert", "river", "mountains", "grassland", "jungle", "lake", "coast", "tundra",
    "swamp",
)
ANIMAL_COLORS = ("brown", "gray", "black", "white", "red", "orange", "yellow")
DIETS = ("plants", "fish", "insects", "meat", "fruit", "seeds", "grass", "berries")
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")

# ---------------------------------------------------------------------------
# Small text helpers
# ---------------------------------------------------------------------------

_TOKEN = re.compile(r"\d|[^\W\d]+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Approximate token count: word runs, single punctuation marks, single digits.

    Equivalent to ``re.findall(r"\\w+|[^\\w\\s]", text)`` with every digit
    counted as its own token.

    Args:
        text: Any text.

    Returns:
        The number of tokens.

    Example:
        >>> count_tokens("Ann is 31 years old.")
        7
    """
    return len(_TOKEN.findall(text))


def fact_accuracy(response: str, answer_keys: Sequence[str]) -> float:
    """Fraction of answer keys found in a response, after whitespace normalisation.

    Runs of whitespace collapse to one space on both sides before the
    substring test.

    Args:
        response: A generated response.
        answer_keys: Exact strings a correct response contains.

    Returns:
        The fraction in ``[0, 1]``; ``1.0`` when there are no keys.
    """
    if not answer_keys:
        return 1.0
    text = " ".join(response.split())
    return sum(" ".join(k.split()) in text for k in answer_keys) / len(answer_keys)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(n: int, singular: str, plural: str | None = None) -> str:
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def _join_and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---------------------------------------------------------------------------
# Task families
# ---------------------------------------------------------------------------


@dataclass
class _Part:
    """One sentence of an answer, the facts it carries, and whether it needs earlier parts."""

    topic: str
    text: str
    keys: list[str]
    depends: bool = False
    subject: str | None = None
    """What the part is about, for its elaboration (see :data:`ELABORATIONS`); None = no elaboration."""


@dataclass
class _Draft:
    """A candidate example before it gets an id."""

    family: str
    prompt: str
    parts: list[_Part] = field(default_factory=list)


@dataclass(frozen=True)
class _Field:
    """One optional fact of a record: its prompt line, sentence templates and keys."""

    line: str
    templates: tuple[str, ...]
    keys: tuple[str, ...]

    @property
    def topic(self) -> str:
        """The line's label (``Favourite color`` in ``Favourite color: pink``)."""
        return self.line.partition(":")[0]


def _field_parts(rng: random.Random, fields: dict[str, _Field], chosen: Sequence[str],
                 values: dict[str, object], subject: str) -> list[_Part]:
    """One part per chosen field, each from a random template of that field."""
    return [
        _Part(fields[f].topic, rng.choice(fields[f].templates).format(**values), list(fields[f].keys),
              subject=subject)
        for f in chosen
    ]


def _profile(rng: random.Random, depends: bool) -> _Draft:
    """A person profile: one sentence per field given in the prompt; maybe a summary."""
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    full = f"{first} {last}"
    age, city, job = rng.randint(18, 79), rng.choice(CITIES), rng.choice(JOBS)
    hobby, pet, pet_name = rng.choice(HOBBIES), rng.choice(PETS), rng.choice(PET_NAMES)
    color, language, food = rng.choice(COLORS), rng.choice(LANGUAGES), rng.choice(FOODS)
    values: dict[str, object] = {
        "first": first, "full": full, "age": age, "city": city, "job": job,
        "a_job": _article(job), "hobby": hobby, "pet": pet, "pet_name": pet_name,
        "color": color, "language": language, "food": food,
    }
    fields = {
        "age": _Field(f"Age: {age}", (
            "{first} is {age} years old.",
            "{first} is now {age} years of age.",
            "At the moment, {first} is {age} years old.",
        ), (str(age),)),
        "city": _Field(f"City: {city}", (
            "{first} lives in the city of {city}.",
            "The home city of {first} is {city}.",
            "These days, {first} has a home in {city}.",
        ), (city,)),
        "job": _Field(f"Job: {job}", (
            "{first} works as {a_job} {job}.",
            "By trade, {first} is {a_job} {job}.",
            "{first} earns a living as {a_job} {job}.",
        ), (job,)),
        "hobby": _Field(f"Hobby: {hobby}", (
            "In free time, {first} enjoys {hobby}.",
            "The favourite hobby of {first} is {hobby}.",
            "{first} likes to spend weekends on {hobby}.",
        ), (hobby,)),
        "pet": _Field(f"Pet: a {pet} named {pet_name}", (
            "{first} has a pet {pet} called {pet_name}.",
            "{first} lives with a {pet} named {pet_name}.",
        ), (pet, pet_name)),
        "color": _Field(f"Favourite color: {color}", (
            "The favourite color of {first} is {color}.",
            "{first} likes the color {color} best.",
        ), (color,)),
        "language": _Field(f"Language: {language}", (
            "{first} speaks {language} at home.",
            "The main language of {first} is {language}.",
        ), (language,)),
        "food": _Field(f"Favourite food: {food}", (
            "The favourite food of {first} is {food}.",
            "{first} loves to eat {food} for dinner.",
        ), (food,)),
    }
    if depends:  # the summary needs age, city and job
        rest = [f for f in fields if f not in ("age", "city", "job")]
        chosen = ["age", "city", "job", *rng.sample(rest, rng.randint(0, 3))]
        rng.shuffle(chosen)
    else:
        chosen = rng.sample(list(fields), rng.randint(3, 7))
    instruction = rng.choice((
        "Write a short profile of this person.",
        "Describe this person in a few sentences.",
        "Give me a profile based on these facts.",
        "Introduce this person using the facts below.",
    ))
    lines = [instruction, f"Name: {full}", *(fields[f].line for f in chosen)]
    name_text = rng.choice((
        "The full name of this person is {full}.",
        "This profile is about {full}.",
        "Let me introduce {full}, the person in this profile.",
    )).format(**values)
    parts = [_Part("Name", name_text, [full], subject=first),
             *_field_parts(rng, fields, chosen, values, first)]
    if depends:
        lines.append(rng.choice(("End with a one sentence summary.", "Finish with a short summary.")))
        text = rng.choice((
            "To sum up, {full} is {age}, lives in {city} and works as {a_job} {job}.",
            "In short, {first} is {a_job} {job} from {city} who is {age} years old.",
        )).format(**values)
        parts.append(_Part("summary", text, [city, job], depends=True))
    return _Draft("profile", "\n".join(lines), parts)


def _product(rng: random.Random, depends: bool) -> _Draft:
    """A product description: an introduction, then one sentence per listed attribute."""
    brand, kind, use = rng.choice(BRANDS), rng.choice(PRODUCT_TYPES), rng.choice(USES)
    name = f"{brand} {kind}"
    price, shipping = rng.randint(5, 99), rng.randint(2, 15)
    weight, warranty, rating = rng.randint(1, 15), rng.randint(1, 5), rng.randint(1, 5)
    color, material = rng.choice(COLORS), rng.choice(MATERIALS)
    years = _plural(warranty, "year")
    values: dict[str, object] = {
        "name": name, "kind": kind, "a_kind": _article(kind), "use": use, "price": price,
        "shipping": shipping, "weight": weight, "years": years, "rating": rating,
        "color": color, "material": material,
    }
    fields = {
        "price": _Field(f"Price: {price} dollars", (
            "The {name} costs {price} dollars.",
            "The {name} sells for {price} dollars.",
            "The price of the {name} is {price} dollars.",
        ), (f"{price} dollars",)),
        "color": _Field(f"Color: {color}", (
            "The {name} comes in a {color} finish.",
            "You can get the {name} in {color}.",
        ), (color,)),
        "material": _Field(f"Material: {material}", (
            "The {name} is made of {material}.",
            "The body of the {name} is built from {material}.",
        ), (material,)),
        "weight": _Field(f"Weight: {weight} kg", (
            "The {name} weighs only {weight} kg.",
            "The {name} has a weight of {weight} kg.",
        ), (f"{weight} kg",)),
        "warranty": _Field(f"Warranty: {years}", (
            "The {name} comes with a warranty of {years}.",
            "The warranty on the {name} lasts {years}.",
        ), (years,)),
        "rating": _Field(f"Rating: {rating} out of 5", (
            "Buyers rate the {name} {rating} out of 5 stars.",
            "The {name} has a rating of {rating} out of 5 from buyers.",
        ), (f"{rating} out of 5",)),
        "shipping": _Field(f"Shipping: {shipping} dollars", (
            "Shipping the {name} costs {shipping} dollars.",
            "Delivery adds {shipping} dollars to the price.",
        ), (f"{shipping} dollars",)),
    }
    if depends:  # the total needs price and shipping
        rest = [f for f in fields if f not in ("price", "shipping")]
        chosen = ["price", "shipping", *rng.sample(rest, rng.randint(1, 4))]
        rng.shuffle(chosen)
    else:
        chosen = rng.sample(list(fields), rng.randint(3, 6))
    instruction = rng.choice((
        "Write a product description.",
        "Describe this product for an online shop.",
        "Write a short text about this product.",
        "Present this product to a buyer.",
    ))
    lines = [instruction, f"Product: {name}", f"Use: {use}", *(fields[f].line for f in chosen)]
    intro = rng.choice((
        "The {name} is {a_kind} {kind} made for {use}.",
        "Meet the {name}, {a_kind} {kind} designed for {use}.",
        "Here is the {name}, a good choice for {use}.",
    )).format(**values)
    parts = [_Part("Product", intro, [name, use], subject=name),
             *_field_parts(rng, fields, chosen, values, name)]
    if depends:
        total = price + shipping
        lines.append(rng.choice((
            "End with the total price with shipping.",
            "Finish by giving the total price, shipping included.",
        )))
        text = rng.choice((
            "With shipping, the {name} costs {total} dollars in total.",
            "The total price with shipping is {total} dollars.",
        )).format(total=total, **values)
        parts.append(_Part("total price", text, [f"{total} dollars"], depends=True))
    return _Draft("product", "\n".join(lines), parts)


def _itinerary(rng: random.Random, depends: bool) -> _Draft:
    """A day-by-day travel plan, one city and place per day; maybe a summary of the cities."""
    n = rng.randint(3, 7)
    stops = list(zip(rng.sample(CITIES, n), [rng.choice(PLACES) for _ in range(n)], strict=True))
    instruction = rng.choice((
        f"Plan a {n} day trip with these stops.",
        "Write a day by day travel plan.",
        "Make an itinerary for this trip.",
        "Turn these stops into a travel plan.",
    ))
    lines = [instruction, *(f"Day {i + 1}: {city}, {place}" for i, (city, place) in enumerate(stops))]
    templates = (
        "Day {day}: go to {city} and visit {place}.",
        "On day {day}, travel to {city} to see {place}.",
        "Day {day} is for {city}, where you can explore {place}.",
    )
    parts = []
    for i, (city, place) in enumerate(stops):
        text = rng.choice(templates).format(day=NUMBER_WORDS[i], city=city, place=place)
        parts.append(_Part(f"Day {i + 1}", text, [city, place], subject=city))
    if depends:
        cities = [city for city, _ in stops]
        lines.append(rng.choice(("End with a summary of the cities.", "Finish with a short summary of the cities.")))
        text = rng.choice((
            "Overall, the trip covers {cities}.",
            "In total, you will see {n} cities: {cities}.",
        )).format(n=n, cities=_join_and(cities))
        parts.append(_Part("summary", text, cities, depends=True))
    return _Draft("itinerary", "\n".join(lines), parts)


def _howto(rng: random.Random, depends: bool) -> _Draft:
    """Numbered steps of a task, each with its duration; maybe the total time."""
    task, n = rng.choice(TASKS), rng.randint(3, 7)
    actions: list[str] = []
    while len(actions) < n:
        action = f"{rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        if action not in actions:
            actions.append(action)
    steps = list(zip(actions, [rng.randint(2, 30) for _ in range(n)], strict=True))
    instruction = rng.choice((
        f"Explain how to {task} in {n} steps.",
        f"Give me the steps to {task}.",
        f"Write short instructions to {task}.",
    ))
    lines = [instruction, *(f"Step {i + 1}: {a} ({m} minutes)" for i, (a, m) in enumerate(steps))]
    templates = (
        "Step {k}: {action}, which takes about {m} minutes.",
        "Step {k} is to {action}, for about {m} minutes.",
        "For step {k}, {action}. This takes {m} minutes.",
    )
    parts = []
    for i, (action, m) in enumerate(steps):
        text = rng.choice(templates).format(k=NUMBER_WORDS[i], action=action, m=m)
        parts.append(_Part(f"Step {i + 1}", text, [action, f"{m} minutes"], subject=action))
    if depends:
        total = sum(m for _, m in steps)
        lines.append(rng.choice(("Finish with the total time.", "End by giving the total time needed.")))
        text = rng.choice((
            "In total, the task takes about {t} minutes.",
            "All steps together take {t} minutes.",
        )).format(t=total)
        parts.append(_Part("total time", text, [f"{total} minutes"], depends=True))
    return _Draft("howto", "\n".join(lines), parts)


def _quantity(rng: random.Random, name: str, unit: str) -> str:
    """A quantity phrase such as ``2 cups of flour``, ``3 eggs`` or ``150 grams of sugar``."""
    if unit == "count":
        return f"{rng.randint(2, 6)} {name}"
    if unit == "gram":
        return f"{50 * rng.randint(1, 8)} grams of {name}"
    n = rng.randint(1, 4) if unit == "cup" else rng.randint(1, 3)
    return f"{_plural(n, unit)} of {name}"


def _recipe(rng: random.Random, depends: bool) -> _Draft:
    """The ingredients of a dish with quantities; maybe the number of ingredients."""
    dish, n = rng.choice(DISHES), rng.randint(3, 7)
    items = [
        (name, _quantity(rng, name, unit), rng.choice(preps))
        for name, unit, preps in rng.sample(INGREDIENTS, n)
    ]
    instruction = rng.choice((
        f"List the ingredients for {_article(dish)} {dish}.",
        f"What goes into this {dish}? Describe each ingredient.",
        f"Write the ingredient list for {_article(dish)} {dish} recipe.",
    ))
    lines = [instruction, *(f"- {quantity} ({prep})" for _, quantity, prep in items)]
    templates = (
        "For this dish, use {q}, {p}.",
        "The recipe calls for {q}, {p}.",
        "To make it, you will need {q}, {p}.",
    )
    parts = [
        _Part(name, rng.choice(templates).format(q=quantity, p=prep), [f"{quantity}, {prep}"], subject=name)
        for name, quantity, prep in items
    ]
    if depends:
        lines.append(rng.choice(("End by giving the number of ingredients.", "Finish with the number of ingredients.")))
        text = rng.choice((
            "In total, the {dish} needs {n} ingredients.",
            "That makes {n} ingredients for the {dish}.",
        )).format(dish=dish, n=n)
        parts.append(_Part("number of ingredients", text, [f"{n} ingredients"], depends=True))
    return _Draft("recipe", "\n".join(lines), parts)


def _city_report(rng: random.Random, depends: bool) -> _Draft:
    """A few numbers for each of several cities; maybe which city has the most of one."""
    n = rng.randint(2, 5)
    cities = rng.sample(CITIES, n)
    counts = rng.sample(CITY_COUNTS, rng.randint(1, 2) if n > 2 else 3)
    # Distinct values per metric, so a comparison never ties.
    values = {"people": rng.sample(range(1, 16), n), **{c: rng.sample(range(2, 61), n) for c in counts}}
    facts = [
        [f"{values['people'][i]} million people", *(f"{values[c][i]} {c}" for c in counts)]
        for i in range(n)
    ]
    metric = rng.choice(["people", *counts])
    instruction = rng.choice((
        "Write a short report on these cities.",
        "Summarize the facts about each city.",
        "Give one sentence per city using these numbers.",
    ))
    lines = [instruction, *(f"{city}: {', '.join(f)}" for city, f in zip(cities, facts, strict=True))]
    templates = ("{city} has {facts}.", "In {city} there are {facts}.", "The city of {city} has {facts}.")
    parts = [
        _Part(city, rng.choice(templates).format(city=city, facts=_join_and(f)), [city, *f],
              subject=city)
        for city, f in zip(cities, facts, strict=True)
    ]
    if depends:
        order = sorted(range(n), key=lambda i: values[metric][i], reverse=True)
        best, other = cities[order[0]], cities[order[1]]
        lines.append(f"Then say which city has the most {metric}.")
        if n == 2:
            key = f"{best} has more {metric}"
            text = rng.choice((f"{key} than {other}.", f"Between the two, {key}."))
        else:
            key = f"{best} has the most {metric}"
            text = rng.choice((f"Of these cities, {key}.", f"Looking at the numbers, {key}."))
        parts.append(_Part(f"most {metric}", text, [key], depends=True))
    return _Draft("city_report", "\n".join(lines), parts)


def _shopping(rng: random.Random, depends: bool) -> _Draft:
    """One sentence per purchase (item, shop, price); maybe the total spent."""
    n = rng.randint(3, 7)
    rows = [(item, rng.choice(SHOPS), rng.randint(1, 40)) for item in rng.sample(SHOP_ITEMS, n)]
    instruction = rng.choice((
        "Describe what I bought today.",
        "Write a note about each thing I bought.",
        "Tell me about these purchases.",
    ))
    lines = [instruction, *(f"- {item}: {p} dollars at the {shop}" for item, shop, p in rows)]
    templates = (
        "I bought {a} {item} at the {shop} for {p} dollars.",
        "The {item} cost {p} dollars at the {shop}.",
        "At the {shop}, I paid {p} dollars for {a} {item}.",
    )
    parts = [
        _Part(item, rng.choice(templates).format(a=_article(item), item=item, shop=shop, p=p),
              [item, f"{p} dollars", shop], subject=item)
        for item, shop, p in rows
    ]
    if depends:
        total = sum(p for _, _, p in rows)
        lines.append(rng.choice(("End with the total amount I spent.", "Finish with how much I spent in total.")))
        text = rng.choice((
            "Altogether, I spent {t} dollars.",
            "The total for everything is {t} dollars.",
        )).format(t=total)
        parts.append(_Part("total", text, [f"{total} dollars"], depends=True))
    return _Draft("shopping", "\n".join(lines), parts)


def _animals(rng: random.Random, depends: bool) -> _Draft:
    """A fact sentence per animal (color, habitat, diet, weight); maybe the heaviest one."""
    n = rng.randint(2, 5)
    animals, weights = rng.sample(ANIMALS, n), rng.sample(range(2, 301), n)  # distinct: no ties
    rows = [
        (a, rng.choice(ANIMAL_COLORS), rng.choice(HABITATS), rng.choice(DIETS), w)
        for a, w in zip(animals, weights, strict=True)
    ]
    instruction = rng.choice((
        "Describe these animals.",
        "Write a short fact sheet for each animal.",
        "Tell me about each of these animals.",
    ))
    lines = [instruction, *(f"{a}: color {c}, lives in {h}, eats {d}, weight {w} kg" for a, c, h, d, w in rows)]
    templates = (
        "The {a} is {c}, lives in the {h} and eats {d}. It weighs about {w} kg.",
        "A {c} animal, the {a} lives in the {h}, eats {d} and weighs {w} kg.",
        "You can find the {a} in the {h}. It is {c}, eats {d} and weighs {w} kg.",
    )
    parts = [
        _Part(a, rng.choice(templates).format(a=a, c=c, h=h, d=d, w=w), [a, c, h, d, f"{w} kg"], subject=a)
        for a, c, h, d, w in rows
    ]
    if depends:
        order = sorted(range(n), key=lambda i: weights[i], reverse=True)
        best, other = animals[order[0]], animals[order[1]]
        lines.append("Then say which animal is the heaviest.")
        if n == 2:
            key = f"{best} is heavier"
            text = rng.choice((f"The {key} than the {other}.", f"Of the two, the {key}."))
        else:
            key = f"{best} is the heaviest"
            text = rng.choice((f"The {key} of these animals.", f"Of all of them, the {key}."))
        parts.append(_Part("heaviest", text, [key], depends=True))
    return _Draft("animals", "\n".join(lines), parts)


ELABORATIONS: dict[str, tuple[str, ...]] = {
    "profile": (
        "Friends of {s} often bring this up when they talk about {s}.",
        "It is one of the first things people learn about {s}.",
        "This says quite a lot about the kind of person {s} is.",
        "{s} is always happy to talk about it with anyone who asks.",
    ),
    "product": (
        "Many buyers of the {s} say that this matters to them.",
        "Reviews of the {s} often point this out as a strong point.",
        "Because of this, the {s} is a solid pick for everyday use.",
        "Keep this in mind when you compare the {s} with other models.",
    ),
    "itinerary": (
        "Take your time there and try the local food in {s}.",
        "Start early, as {s} can get quite busy later in the day.",
        "Many travelers call this the highlight of a visit to {s}.",
        "Save some time in the evening for a quiet walk around {s}.",
    ),
    "howto": (
        "Take care to {s} properly before you move on.",
        "Do not rush this part, because the next steps depend on it.",
        "Have your tools ready so that you can {s} without a break.",
        "If you are unsure, it is fine to {s} a second time.",
    ),
    "recipe": (
        "Using good {s} makes a real difference to the taste of the dish.",
        "Measure the {s} carefully before you start cooking.",
        "You can find {s} in most shops and markets.",
        "Keep the {s} close at hand, as you will need it early on.",
    ),
    "city_report": (
        "These numbers give a good first picture of life in {s}.",
        "Local people in {s} are proud of the numbers.",
        "Visitors to {s} often notice this within a few days.",
        "The city council of {s} shares these numbers every year.",
    ),
    "shopping": (
        "I think that the {s} was worth the money.",
        "I had wanted a new {s} for quite a while.",
        "The {s} looks good and seems to be well made.",
        "I will probably use the {s} every day from now on.",
    ),
    "animals": (
        "Scientists still study how the {s} lives in the wild.",
        "Many people are surprised to learn these facts about the {s}.",
        "The {s} is a common sight in books about nature.",
        "Zoo visitors often stop to watch the {s} for a long time.",
    ),
}
"""Per family, sentences that follow each independent part (``{s}`` = the part's subject).

They carry no fact, like most of a real answer's words; they make parts long
enough (about 25 tokens) that filling them in parallel pays for the plan."""


def _elaborate(rng: random.Random, draft: _Draft) -> _Draft:
    """Follow every part that has a subject with one of its family's elaborations."""
    for part in draft.parts:
        if part.subject is not None:
            part.text = f"{part.text} {rng.choice(ELABORATIONS[draft.family]).format(s=part.subject)}"
    return draft


_FAMILIES: dict[str, Callable[[random.Random, bool], _Draft]] = {
    "profile": _profile,
    "product": _product,
    "itinerary": _itinerary,
    "howto": _howto,
    "recipe": _recipe,
    "city_report": _city_report,
    "shopping": _shopping,
    "animals": _animals,
}
FAMILIES = tuple(_FAMILIES)
"""Names of the task families, in sampling order."""

# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------


def _split_seed(split: str, seed: int) -> int:
    digest = hashlib.sha256(f"pdlightning.synthetic:{seed}:{split}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def prompt_split(prompt: str) -> str:
    """The one split a prompt may belong to (a BLAKE2 hash of its text).

    Args:
        prompt: A prompt string.

    Returns:
        ``"train"``, ``"validation"`` or ``"test"``.
    """
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big")
    bucket %= _N_BUCKETS
    return next(s for s, r in _SPLIT_BUCKETS.items() if bucket in r)


def _within_bounds(parts: Sequence[_Part]) -> bool:
    lengths = [count_tokens(p.text) for p in parts]
    return (
        MIN_PARTS <= len(parts) <= MAX_PARTS
        and all(MIN_PART_TOKENS <= n <= MAX_PART_TOKENS for n in lengths)
        and MIN_ANSWER_TOKENS <= sum(lengths) <= MAX_ANSWER_TOKENS
    )


def _to_example(draft: _Draft, split: str, index: int) -> dict:
    keys: list[str] = []
    for part in draft.parts:
        assert part.text == part.text.strip() and "\n" not in part.text, part.text
        assert any(k in part.text for k in part.keys), (part.text, part.keys)
        keys.extend(k for k in part.keys if k not in keys)
    return {
        "id": f"{split}-{index:06d}",
        "split": split,
        "family": draft.family,
        "prompt": draft.prompt,
        "response": "\n".join(p.text for p in draft.parts),
        "parts": [{"topic": p.topic, "text": p.text, "depends": p.depends} for p in draft.parts],
        "answer_keys": keys,
    }


def generate_split(split: str, n: int, seed: int = 0) -> list[dict]:
    """Generate ``n`` examples of one split.

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
        n: Number of examples.
        seed: Base seed; the split's generator is seeded from ``(seed, split)``.

    Returns:
        The examples, ids ``f"{split}-{i:06d}"``. Prompts are unique within the
        split and never occur in another split.

    Raises:
        ValueError: If the split is unknown or ``n`` is negative.
    """
    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(_split_seed(split, seed))
    builders = list(_FAMILIES.values())
    examples: list[dict] = []
    seen: set[str] = set()
    depends_slot = rng.randrange(DEPENDS_BLOCK)  # place of the depends example in this block
    attempts = 0
    while len(examples) < n:
        attempts += 1
        if attempts > 100 * n + 1000:  # pragma: no cover - would mean a broken family
            raise RuntimeError(f"could not generate {n} unique {split} examples")
        builder = rng.choice(builders)
        draft = _elaborate(rng, builder(rng, len(examples) % DEPENDS_BLOCK == depends_slot))
        if draft.prompt in seen or prompt_split(draft.prompt) != split:
            continue
        if not _within_bounds(draft.parts):
            continue
        seen.add(draft.prompt)
        examples.append(_to_example(draft, split, len(examples)))
        if len(examples) % DEPENDS_BLOCK == 0:
            depends_slot = rng.randrange(DEPENDS_BLOCK)
    return examples


def generate_dataset(sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, list[dict]]:
    """Generate several splits at once.

    Args:
        sizes: Examples per split; defaults to :data:`DEFAULT_SIZES`.
        seed: Base seed shared by all splits.

    Returns:
        Split name to examples.
    """
    sizes = dict(DEFAULT_SIZES) if sizes is None else sizes
    return {split: generate_split(split, n, seed) for split, n in sizes.items()}


# ---------------------------------------------------------------------------
# Files and statistics
# ---------------------------------------------------------------------------


def write_jsonl(examples: Iterable[dict], path: str | Path) -> None:
    """Write examples as JSON lines (UTF-8, ``\\n`` line ends), creating parent folders.

    Args:
        examples: JSON-serialisable dicts.
        path: Output file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for example in examples:
            f.write(json.dumps(example, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSON-lines file written by :func:`write_jsonl`.

    Args:
        path: Input file.

    Returns:
        One dict per non-empty line.
    """
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_stats(examples: Sequence[dict]) -> dict[str, float]:
    """Token and part statistics of a list of examples.

    Args:
        examples: Generated examples (non-empty).

    Returns:
        ``n``, ``tokens_mean/min/max`` (per answer), ``parts_mean/min/max``,
        ``part_tokens_mean`` and ``depends_fraction``.
    """
    tokens = [count_tokens(e["response"]) for e in examples]
    parts = [len(e["parts"]) for e in examples]
    part_tokens = [count_tokens(p["text"]) for e in examples for p in e["parts"]]
    return {
        "n": len(examples),
        "tokens_mean": statistics.fmean(tokens),
        "tokens_min": min(tokens),
        "tokens_max": max(tokens),
        "parts_mean": statistics.fmean(parts),
        "parts_min": min(parts),
        "parts_max": max(parts),
        "part_tokens_mean": statistics.fmean(part_tokens),
        "depends_fraction": sum(e["parts"][-1]["depends"] for e in examples) / len(examples),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write ``DIR/{train,validation,test}.jsonl`` and print statistics.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        Exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m pdlightning.data.synthetic",
        description="Generate the synthetic instruction set with checkable answers.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=DEFAULT_SIZES[split], help="examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = {split: getattr(args, split) for split in SPLITS}
    dataset = generate_dataset(sizes, seed=args.seed)
    for split, examples in dataset.items():
        path = args.out / f"{split}.jsonl"
        write_jsonl(examples, path)
        if not examples:
            print(f"{split}: 0 examples -> {path}")
            continue
        s = split_stats(examples)
        print(
            f"{split}: {s['n']} examples -> {path}\n"
            f"  tokens/answer mean {s['tokens_mean']:.1f} min {s['tokens_min']} max {s['tokens_max']}"
            f" | parts/answer mean {s['parts_mean']:.2f} min {s['parts_min']} max {s['parts_max']}"
            f" | tokens/part mean {s['part_tokens_mean']:.1f}"
            f" | depends {s['depends_fraction']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
