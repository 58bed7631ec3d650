"""Regenerate the shipped demo corpus: `python assets/corpus/make_corpus.py` (writes *.txt next to this file).

The text is original, made from templates with a fixed seed, so the files are stable and free to ship.
The generated .txt files are committed; the tokenizer (scripts/build_tokenizer.py) and the tiny
pretraining demo read those files, not this script, so editing it changes nothing until you rerun it.
"""
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

NAMES = ["Ada", "Ben", "Cora", "Dev", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jon", "Kira", "Leo",
         "Mina", "Noor", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor", "Wen", "Yara", "Zane"]
PLACES = ["the harbor", "the old library", "the market square", "a small farm", "the train station",
          "the hill above town", "the river bank", "the school garden", "a quiet cafe", "the bakery",
          "the workshop", "the forest path", "the museum", "the bridge", "the lighthouse", "the orchard"]
TIMES = ["In the morning", "At noon", "Late in the evening", "On Sunday", "Before sunrise", "After lunch",
         "During the storm", "Last winter", "Every spring", "On a cold night", "At the end of the day"]
OBJECTS = ["a red kite", "an old map", "a basket of apples", "a wooden box", "a broken clock", "a blue notebook",
           "a loaf of bread", "a brass key", "a paper boat", "a jar of honey", "a pair of boots", "a small radio",
           "a bundle of letters", "a green umbrella", "a tin of tea", "a folding chair"]
ANIMALS = ["cat", "dog", "goat", "heron", "fox", "owl", "horse", "rabbit", "crow", "turtle", "sheep", "duck"]
ADJS = ["quiet", "bright", "tired", "curious", "patient", "cheerful", "careful", "brave", "gentle", "busy",
        "clever", "calm", "nervous", "proud", "lucky", "honest"]
VERBS = ["found", "carried", "fixed", "painted", "cleaned", "opened", "repaired", "counted", "shared", "packed",
         "measured", "borrowed", "returned", "sorted", "wrapped", "weighed"]
FEELINGS = ["happy", "surprised", "worried", "relieved", "amused", "grateful", "puzzled", "calm"]
WEATHER = ["sunny", "cloudy", "windy", "rainy", "foggy", "cold", "warm", "snowy"]
COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "gray", "brown"]
FOODS = ["soup", "rice", "bread", "beans", "noodles", "salad", "porridge", "stew", "pancakes", "lentils"]
TOOLS = ["hammer", "saw", "ruler", "brush", "ladder", "needle", "shovel", "wrench", "rope", "lamp"]
UNITS = [("meters", "long"), ("kilograms", "heavy"), ("liters", "in volume"), ("centimeters", "wide")]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TOPICS = {
    "rivers": "carry water from high ground to the sea, and they shape the land they pass through",
    "bridges": "let people cross water or deep valleys, and they must carry much more than their own weight",
    "bread": "is made from flour, water, salt and yeast, and it rises because the yeast makes gas",
    "clocks": "measure time by counting a steady motion, such as a swinging weight or a vibrating crystal",
    "maps": "show places in a smaller size, so a short line on paper can stand for a long road",
    "seeds": "hold a tiny plant and a store of food, and they wait until water and warmth wake them",
    "bees": "visit flowers for nectar and pollen, and they carry pollen from one flower to the next",
    "tides": "rise and fall twice a day, pulled mostly by the moon and a little by the sun",
    "libraries": "keep books and records so that people can read what others wrote long ago",
    "wind": "is air that moves from places of high pressure to places of low pressure",
    "gardens": "need light, water and good soil, and they reward patient work with food and flowers",
    "numbers": "let us count, compare and measure, and the same rules work for small and large amounts",
}


def plural(word: str, count: int = 2) -> str:
    """'fox' -> 'foxes', 'sheep' -> 'sheep'; singular when count == 1."""
    if count == 1 or word == "sheep":
        return word
    return word + ("es" if word.endswith(("x", "s", "ch")) else "s")


def sentence(rng: random.Random) -> str:
    """One sentence from one of several templates."""
    n, m = rng.sample(NAMES, 2)
    k = rng.randint(2, 99)
    templates = [
        f"{rng.choice(TIMES)}, {n} {rng.choice(VERBS)} {rng.choice(OBJECTS)} near {rng.choice(PLACES)}.",
        f"{n} was {rng.choice(ADJS)} and a little {rng.choice(FEELINGS)} when {m} arrived at {rng.choice(PLACES)}.",
        f"The {rng.choice(ADJS)} {rng.choice(ANIMALS)} watched {n} from {rng.choice(PLACES)}.",
        f"{n} asked {m} to bring {rng.choice(OBJECTS)} and a {rng.choice(TOOLS)}.",
        f"It was {rng.choice(WEATHER)} today, so {n} stayed at {rng.choice(PLACES)} until "
        f"{rng.randint(1, 12)} o'clock.",
        f"{n} counted {k} {plural(rng.choice(ANIMALS), k)} and wrote the number {k} in the "
        f"{rng.choice(COLORS)} notebook.",
        f"For dinner {n} cooked {rng.choice(FOODS)} with {m}, and they ate it at {rng.choice(PLACES)}.",
        f"\"Have you seen {rng.choice(OBJECTS)}?\" {n} asked. \"It was near {rng.choice(PLACES)},\" said {m}.",
        f"The door was painted {rng.choice(COLORS)}, and the roof was {rng.choice(COLORS)}.",
        f"{n} walked {k} steps to {rng.choice(PLACES)} and then {rng.randint(2, 40)} more to {rng.choice(PLACES)}.",
        f"On {rng.choice(DAYS)}, {rng.randint(1, 28)} {rng.choice(MONTHS)}, {n} and {m} {rng.choice(VERBS)} "
        f"{rng.choice(OBJECTS)}.",
        f"Nobody knew why the {rng.choice(ANIMALS)} kept returning to {rng.choice(PLACES)}, but {n} had a guess.",
        f"\"Look at that {rng.choice(ANIMALS)}!\" shouted {n}; {m} laughed (it was only a shadow).",
        f"{n}'s list for {rng.choice(DAYS)}: {rng.choice(FOODS)}, {rng.choice(FOODS)}, and {rng.choice(OBJECTS)}.",
        f"What a {rng.choice(ADJS)} {rng.choice(ANIMALS)}! It followed {n} all the way to {rng.choice(PLACES)}.",
    ]
    return rng.choice(templates)


def story(rng: random.Random) -> str:
    """A short paragraph in one of five shapes: a search, a recipe, a letter, a weather report, a repair."""
    return rng.choice([search_story, recipe, letter, weather_report, repair])(rng)


def search_story(rng: random.Random) -> str:
    """A small plot with a beginning, a problem and an ending."""
    n, m = rng.sample(NAMES, 2)
    obj, place, tool = rng.choice(OBJECTS), rng.choice(PLACES), rng.choice(TOOLS)
    parts = [
        f"{rng.choice(TIMES)}, {n} went to {place} to look for {obj}.",
        f"The weather was {rng.choice(WEATHER)}, and the path was longer than {n} remembered.",
        sentence(rng),
        f"When {n} finally found {obj}, it was stuck under a heavy stone.",
        f"{m} came by with a {tool}, and together they moved the stone {rng.randint(2, 9)} times "
        f"before it rolled away.",
        sentence(rng),
        f"In the end {n} felt {rng.choice(FEELINGS)}, and {m} said it had been a {rng.choice(ADJS)} day.",
    ]
    return " ".join(parts)


def recipe(rng: random.Random) -> str:
    """Numbered cooking steps with amounts and times."""
    food, n = rng.choice(FOODS), rng.choice(NAMES)
    cups, minutes, people = rng.randint(1, 4), rng.randint(5, 45), rng.randint(2, 8)
    return (f"How {n} makes {food} for {people} people. First, wash {cups} {plural('cup', cups)} of the main "
            f"ingredient and put them in a pot with {cups * 2} cups of water. Second, add a pinch of salt and "
            f"bring it to a boil. "
            f"Third, lower the heat and let it cook for {minutes} minutes, stirring now and then. "
            f"Finally, taste it, add a little more salt if needed, and serve it while it is warm. "
            f"Each person gets about {round(cups * 250 / people)} grams.")


def letter(rng: random.Random) -> str:
    """A short friendly letter."""
    n, m = rng.sample(NAMES, 2)
    return (f"Dear {m}, thank you for {rng.choice(OBJECTS)}. It arrived on {rng.choice(DAYS)} and I have used it "
            f"every day since. Here the weather has been {rng.choice(WEATHER)}, and the {rng.choice(ANIMALS)} "
            f"next door still visits {rng.choice(PLACES)} each evening. {sentence(rng)} "
            f"I hope you can visit in {rng.choice(MONTHS)}. With warm wishes, {n}.")


def weather_report(rng: random.Random) -> str:
    """A morning weather report with temperatures and wind."""
    low = rng.randint(-10, 20)
    high = low + rng.randint(2, 15)
    return (f"Weather for {rng.choice(DAYS)}: the morning will be {rng.choice(WEATHER)} with a low of {low} degrees. "
            f"By the afternoon it turns {rng.choice(WEATHER)}, and the high will reach {high} degrees. "
            f"Wind from the {rng.choice(['north', 'south', 'east', 'west'])} at {rng.randint(5, 60)} kilometers "
            f"per hour. The chance of rain is {rng.randint(0, 10) * 10} percent.")


def repair(rng: random.Random) -> str:
    """Instructions for fixing something, with a reason for each step."""
    obj, tool = rng.choice(OBJECTS), rng.choice(TOOLS)
    return (f"To repair {obj}, start by looking at it closely in good light, because a small crack is easy to miss. "
            f"Use a {tool} gently, since too much force can make the damage worse. "
            f"Work in short steps of {rng.randint(2, 10)} minutes and check your progress after each one. "
            f"{rng.choice(NAMES)} says that patience matters more than skill for this kind of work.")


def fact_line(rng: random.Random) -> str:
    """A line of numbers: measurements, dates, counting, comparisons, times."""
    a, b = rng.randint(1, 500), rng.randint(1, 500)
    unit, adj = rng.choice(UNITS)
    year = rng.randint(1850, 2030)
    topic = rng.choice(list(TOPICS))
    templates = [
        f"The {rng.choice(TOOLS)} is {a} {unit} {adj}, and the box is {b} {unit} {adj}.",
        f"{a} is {'greater than' if a > b else 'less than' if a < b else 'equal to'} {b}.",
        f"The number after {a} is {a + 1}, and the number before {a} is {a - 1}.",
        f"Twice {a} is {2 * a}, and half of {2 * b} is {b}.",
        f"In {year} the town had {a * 10 + b} people and {b % 40 + 2} bakeries.",
        f"The train leaves at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d} and takes {a % 90 + 5} minutes.",
        f"A {rng.choice(WEATHER)} day in {rng.choice(MONTHS)} reached {a % 35 - 5} degrees.",
        f"Counting by {a % 9 + 2}s: " + ", ".join(str((a % 9 + 2) * i) for i in range(1, 7)) + ".",
        f"{topic.capitalize()} {TOPICS[topic]}.",
        f"The shop sold {a} {rng.choice(FOODS)} bowls on {rng.choice(DAYS)} and {b} on {rng.choice(DAYS)}, "
        f"{a + b} in total.",
        f"Page {a} of the {rng.choice(COLORS)} book lists {b % 12 + 1} recipes for {rng.choice(FOODS)}.",
    ]
    return rng.choice(templates)


def arithmetic_line(rng: random.Random) -> str:
    """A question and its correct answer, e.g. 'What is 12 + 7? 19'."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}? {value}"


def dialogue_line(rng: random.Random) -> str:
    """A one-line exchange in the User:/Assistant: shape the chat template uses."""
    topic = rng.choice(list(TOPICS))
    n = rng.choice(NAMES)
    k = rng.randint(2, 30)
    pairs = [
        (f"Tell me something about {topic}.", f"{topic.capitalize()} {TOPICS[topic]}."),
        (f"What color is the sky on a {rng.choice(['clear', 'sunny'])} day?", "It is blue."),
        (f"How many legs does a {rng.choice(['duck', 'heron', 'crow'])} have?", "It has two legs."),
        (f"How many legs does a {rng.choice(['cat', 'dog', 'goat', 'horse', 'fox'])} have?", "It has four legs."),
        (f"Count from 1 to {k % 9 + 2}.", ", ".join(str(i) for i in range(1, k % 9 + 3)) + "."),
        (f"Write one sentence about {n}.", sentence(rng)),
        (f"What comes after {rng.choice(DAYS)}?", None),
        (f"Which is larger, {k} or {k + 7}?", f"{k + 7} is larger than {k}."),
    ]
    question, answer = rng.choice(pairs)
    if answer is None:  # the day after the one in the question
        day = question.split()[-1].rstrip("?")
        answer = f"{DAYS[(DAYS.index(day) + 1) % 7]} comes after {day}."
    return f"User: {question} Assistant: {answer}"


def main() -> None:
    rng = random.Random(20250630)
    files = {
        "stories.txt": [story(rng) for _ in range(420)],
        "sentences.txt": [sentence(rng) for _ in range(900)],
        "numbers.txt": [fact_line(rng) for _ in range(1000)],
        "arithmetic.txt": [arithmetic_line(rng) for _ in range(60)],
        "dialogues.txt": [dialogue_line(rng) for _ in range(450)],
    }
    for name, lines in files.items():
        (HERE / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
