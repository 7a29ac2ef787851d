"""Build the shipped validation corpus ``src/stable_regions/data/corpus.jsonl``.

Two sources, recorded per prompt in the ``source`` field:

* texts written for this project (prose, dialogue, facts, numbers, lists, seven languages,
  code), released with the project;
* excerpts of the CPython standard library installed with the interpreter that runs this
  script (docstrings as prose, function bodies as code), under the PSF License 2.0: offline,
  permissively licensed, and real-world text that nobody wrote for this test.

Run ``python scripts/build_corpus.py`` to rebuild (the shipped file was built with CPython
3.11.7); the output is deterministic for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import sys
import textwrap
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "stable_regions" / "data" / "corpus.jsonl"
PROJECT = "stable-regions project (written for this corpus, CC0)"

PROSE = """\
The old lighthouse keeper climbed the stairs every evening, counting the steps as his father had taught him.
By the time the rain stopped, the river had already swallowed the lower half of the village.
She opened the letter slowly, as if the words inside might change if she hurried.
Most of the research budget went into a machine that nobody in the department knew how to repair.
The train was late again, so the commuters did what they always did: they complained and then they waited.
In the spring the hillside turns yellow with wild mustard, and the bees arrive before the tourists do.
He had never seen snow before, and for a long moment he simply stood at the window and watched it fall.
The committee postponed its decision, citing the need for further consultation with local residents.
A good recipe is less a set of rules than a record of somebody's mistakes.
The museum's newest exhibit explains how medieval scribes made ink from oak galls and iron salts.
When the power went out, the whole street gathered on the pavement and shared what food they had.
The startup promised to revolutionize grocery delivery, but it ran out of money within eighteen months.
Every map is a simplification; the question is only which details the mapmaker decided to leave out.
Our neighbour's dog barks at the postman every morning at exactly half past eight.
The treaty was signed in a small hotel room, far from the cameras that waited in the capital.
After three weeks at sea, the sailors finally caught sight of a thin grey line on the horizon.
The library closes early on Fridays, which is why the students crowd in on Thursday nights.
Scientists were surprised to find that the bacteria survived in water almost hot enough to boil.
It was the kind of town where everyone knew your name and most of your secrets.
The painting had hung in the hallway for decades before anyone thought to ask who had painted it.
Unemployment fell for the third consecutive quarter, although wages barely kept pace with inflation.
The bridge was designed to sway a little in strong winds, which alarmed the people who walked across it.
Grandmother kept every receipt she had ever received in shoeboxes under her bed.
The forest was so quiet that the snapping of a single twig sounded like a gunshot.
Once upon a time, in a kingdom by the sea, there lived a princess who could not sleep.
The engineers tested the new battery in temperatures ranging from minus forty to plus sixty degrees.
Nobody expected the quiet student in the back row to win the national mathematics competition.
The smell of fresh bread drifted from the bakery and down the narrow street.
The volcano had been dormant for centuries, so the farmers planted vineyards on its slopes.
In the final chapter, the detective gathers all the suspects in the library and explains what happened.
The city council voted to replace the old parking lot with a public park.
Because the patient was allergic to penicillin, the doctor prescribed a different antibiotic.
The choir rehearsed the same four bars for an hour until every voice came in at once.
Winter arrived early that year, and the harvest had to be brought in under a thin layer of frost.
The software update fixed the bug but introduced two new ones.
At the top of the mountain, the air was thin and the view stretched all the way to the sea.
"""

DIALOGUE = """\
User: Can you recommend a good book for a long flight?\\nAssistant:
Q: What time does the museum open on Sundays?\\nA:
Customer: I ordered a blue sweater but received a green one.\\nAgent: I'm sorry to hear that. Could you
"Are you coming to the party tonight?" asked Maria.\\n"I don't know," said Tom. "
Teacher: Who can tell me what photosynthesis is?\\nStudent:
User: How do I reverse a list in Python?\\nAssistant: You can use
Doctor: How long have you had these headaches?\\nPatient:
A: Did you remember to lock the door?\\nB: I think so, but
User: Translate "good morning" into Spanish.\\nAssistant:
Interviewer: What is your greatest weakness?\\nCandidate:
"Where were you last night?" the inspector asked.\\n"At home,"
User: Write a haiku about autumn.\\nAssistant:
Mom: Did you finish your homework?\\nKid: Almost, I just need to
User: What is the capital of Australia?\\nAssistant: The capital of Australia is
Q: Is it safe to eat raw cookie dough?\\nA:
Pilot: Tower, this is flight 212 requesting permission to land.\\nTower:
User: Summarize the plot of Romeo and Juliet in one sentence.\\nAssistant:
Alice: I think we should take the train.\\nBob: The train? It takes twice as long as
User: My code throws a KeyError. What does that mean?\\nAssistant: A KeyError means
Waiter: Are you ready to order?\\nGuest: Yes, I'll have the
User: hi\\nAssistant: Hello! How can I help you today?\\nUser: tell me a joke\\nAssistant:
"I can't believe you did that," she said.\\n"Did what?" he replied, trying to look
User: Explain gravity to a five-year-old.\\nAssistant:
Host: Welcome back to the show. Tonight our guest is
User: What's 15% of 80?\\nAssistant:
Shopkeeper: That will be twelve dollars, please.\\nCustomer:
User: Is a tomato a fruit or a vegetable?\\nAssistant:
Coach: One more lap!\\nPlayer:
User: Give me three tips for better sleep.\\nAssistant: 1.
Q: Why is the sky blue?\\nA: Because
"""

FACTUAL = """\
The capital of France is
Water boils at a temperature of
The largest planet in the solar system is
William Shakespeare was born in the town of
The chemical symbol for gold is
The Great Wall of China was built to
The speed of light in a vacuum is approximately
The first person to walk on the Moon was
Mount Everest is located in the
The Amazon River flows through
DNA stands for
The Eiffel Tower was completed in the year
The human heart has four
Penicillin was discovered by
The currency of Japan is the
The Pacific Ocean is the
Photosynthesis converts sunlight, water and carbon dioxide into
The tallest animal in the world is the
The Mona Lisa was painted by
The boiling point of water on the Fahrenheit scale is
The author of "Pride and Prejudice" is
The smallest prime number is
Albert Einstein is best known for the theory of
The official language of Brazil is
The Berlin Wall fell in
The freezing point of water is
The planet closest to the Sun is
Honey bees communicate the location of flowers by
The longest bone in the human body is the
The Statue of Liberty was a gift from
Light travels from the Sun to the Earth in about
The Roman Empire's first emperor was
The process by which plants lose water through their leaves is called
The periodic table was first published by
A group of lions is called a
The inventor of the telephone is usually said to be
Antarctica is the coldest
The main ingredient of guacamole is
The Nile is generally regarded as the longest river in
Jupiter has a famous storm called the
"""

NUMBERS = """\
1, 2, 3, 4, 5, 6, 7,
2, 4, 8, 16, 32,
The square root of 144 is
If a train travels 60 miles in one hour, in three hours it travels
Half of 250 is
There are 60 seconds in a minute and 60 minutes in an
3.14159 is an approximation of
The year after 1999 was
10 - 3 =
A dozen eggs is
Monday, Tuesday, Wednesday,
January, February, March, April,
x = 5; y = x * 2; so y equals
The sum of the angles of a triangle is
1/2 + 1/4 =
Fibonacci: 1, 1, 2, 3, 5, 8, 13,
The derivative of x^2 is
Solve for x: 2x + 6 = 10. x =
In binary, the number 5 is written as
100 degrees Celsius equals
A kilometre is one thousand
7 x 8 =
The price went from $40 to $50, an increase of
Roman numerals: I, II, III, IV, V,
The integral of 1/x is
"""

LISTS = """\
Shopping list:\\n- milk\\n- eggs\\n- bread\\n-
Things to pack for the beach:\\n1. sunscreen\\n2. towel\\n3.
Primary colors: red, blue, and
The planets in order from the Sun: Mercury, Venus, Earth,
Ingredients: flour, sugar, butter,
Steps to change a tyre:\\n1. Loosen the nuts.\\n2.
Top 5 programming languages:\\n1. Python\\n2. JavaScript\\n3.
Continents: Africa, Antarctica, Asia,
To do today:\\n- [x] answer emails\\n- [ ] call the bank\\n- [ ]
The seven days of the week are Monday, Tuesday,
Tools in the shed: a hammer, a saw, a
Reasons to learn a second language:\\n* it helps with travel\\n*
Chess pieces: king, queen, rook,
Agenda\\n1. Welcome\\n2. Budget review\\n3.
Favourite fruits: apples, bananas, cherries,
Symptoms of the flu include fever, cough,
Musical instruments: piano, violin, trumpet,
The four seasons are spring, summer,
Countries in South America: Argentina, Bolivia, Brazil,
Keyboard shortcuts:\\nCtrl+C copy\\nCtrl+V paste\\nCtrl+Z
"""

LANGUAGES = {
    "fr": """\
La capitale de l'Italie est
Il était une fois une petite fille qui vivait au bord de la forêt.
Je voudrais réserver une table pour deux personnes ce soir, s'il vous plaît.
Le chat dort sur le canapé depuis
Les élections municipales auront lieu le mois prochain dans toute la
Pour faire une bonne omelette, il faut d'abord
La Révolution française a commencé en
Quand il pleut, nous restons à la maison et nous
""",
    "de": """\
Die Hauptstadt von Deutschland ist
Es war einmal ein König, der hatte drei Töchter.
Ich habe meinen Regenschirm im Zug vergessen und musste deshalb
Der Rhein fließt durch die Schweiz, Deutschland und
Am Wochenende fahren wir mit dem Fahrrad an den
Die Besprechung wurde auf nächsten Dienstag verschoben, weil
Goethe schrieb das Drama
Im Winter ist es in Berlin oft kalt und
""",
    "es": """\
La capital de España es
Había una vez un pescador que vivía junto al mar.
Mañana vamos a la playa si no
El Quijote fue escrito por
Para llegar a la estación, siga recto y luego gire a la
Mi abuela siempre preparaba paella los domingos porque
El río más largo de Sudamérica es el
Los niños jugaban en el parque hasta que
""",
    "it": """\
La capitale del Giappone è
C'era una volta un falegname di nome Geppetto che
Vorrei un caffè e un cornetto, per
Il Colosseo si trova nel centro di
Domani sera andiamo al cinema a vedere
La Divina Commedia è stata scritta da
""",
    "pt": """\
A capital de Portugal é
O Brasil é o maior país da América do
Era uma vez um menino que queria voar como os
Amanhã vou ao mercado comprar frutas e
O futebol é o esporte mais popular do
""",
    "nl": """\
De hoofdstad van Nederland is
Gisteren fietste ik naar mijn werk in de regen, en
Het Rijksmuseum in Amsterdam is bekend om de schilderijen van
In de winter schaatsen veel mensen op de
""",
    "sv": """\
Sveriges huvudstad är
På sommaren åker många svenskar till sina
Jag dricker kaffe varje morgon innan jag
""",
    "pl": """\
Stolicą Polski jest
Wczoraj wieczorem poszliśmy do kina na
Maria Skłodowska-Curie otrzymała Nagrodę Nobla w dziedzinie
""",
}

CODE = """\
def add(a, b):\\n    return
import numpy as np\\n\\nx = np.array([1, 2, 3])\\nprint(x.
for i in range(10):\\n    if i % 2 == 0:\\n        print(
class Stack:\\n    def __init__(self):\\n        self.items = []\\n\\n    def push(self, item):\\n        self.items.
SELECT name, age FROM users WHERE age >
function greet(name) {\\n  return "Hello, " +
#include <stdio.h>\\n\\nint main(void) {\\n    printf(
const numbers = [1, 2, 3];\\nconst doubled = numbers.map(n =>
<html>\\n  <head>\\n    <title>My page</title>\\n  </head>\\n  <
git commit -m "
with open("data.txt") as f:\\n    for line in f:\\n        print(line.
def factorial(n):\\n    if n == 0:\\n        return 1\\n    return n *
x = [i ** 2 for i in range(
fn main() {\\n    let v = vec![1, 2, 3];\\n    println!("{:?}",
public class Main {\\n    public static void main(String[] args) {\\n        System.out.
{"name": "Alice", "age": 30, "city":
import pandas as pd\\ndf = pd.read_csv("sales.csv")\\ndf.groupby("region")["revenue"].
$ ls -la\\ntotal 48\\ndrwxr-xr-x  5 user user 4096 Jan 10 09:12 .\\n$ cd
try:\\n    value = int(text)\\nexcept ValueError:\\n
# Compute the mean of a list\\ndef mean(xs):\\n    return sum(xs) /
"""

LONG = """\
The history of the bicycle is a story of many small improvements. The first two-wheeled machines of the early nineteenth century had no pedals at all: riders pushed themselves along with their feet. Pedals attached to the front wheel came decades later, and because the speed depended on the size of that wheel, manufacturers built ever larger front wheels until the penny-farthing made riding both fast and dangerous. The safety bicycle, with two wheels of equal size and a chain driving the rear one, solved the problem, and the pneumatic tyre soon made it comfortable as well. Within a few years
When you first start learning to cook, it is tempting to follow recipes exactly, measuring every gram and timing every minute. That is a fine way to begin, but the real skill lies in understanding why each step is there. Why do you rest meat after cooking it? Why does bread dough need to be kneaded? Why do some sauces split when they are heated too quickly? Once you know the reasons, you can adapt a recipe to the ingredients you actually have, fix mistakes as they happen, and eventually
The town meeting began at seven o'clock sharp. The mayor thanked everyone for coming on such a cold evening and then turned to the first item on the agenda: the proposal to close the old primary school and send the children by bus to the larger school in the next valley. Several parents stood up to speak against it. One of them, a carpenter who had attended the school himself, said that the building was not just a place for lessons but the heart of the community, and that
Dear hiring manager,\\n\\nI am writing to apply for the position of data analyst advertised on your website. Over the past four years I have worked at a regional logistics company, where I built the reporting system that the operations team now uses every day. Before that, I completed a degree in statistics, with a thesis on forecasting demand for perishable goods. I am particularly interested in your company because
In the beginning the universe was very hot and very dense. As it expanded, it cooled, and within a few minutes protons and neutrons combined to form the nuclei of the lightest elements: hydrogen, helium and a trace of lithium. For the next few hundred thousand years the universe was an opaque fog of charged particles and light. Only when it had cooled enough for electrons to bind to nuclei did the fog clear, releasing the radiation that we still observe today as
Meeting notes, project Atlas, 14 March\\n\\nAttendees: Priya, Jonas, Mei, Carlos\\n\\n1. Status: the data pipeline is running nightly; two failures last week were caused by a full disk.\\n2. The client asked for a weekly summary email instead of the dashboard.\\n3. Jonas will evaluate whether the forecasting model can be retrained monthly.\\n\\nAction items:\\n- Priya:
Le village se trouvait au fond d'une vallée étroite, entouré de montagnes si hautes qu'en hiver le soleil n'y apparaissait que quelques heures par jour. Les habitants vivaient de l'élevage et du bois, et chaque automne ils descendaient les troupeaux des alpages dans une grande fête où tout le monde
Die Stadt hatte sich in den letzten zwanzig Jahren stark verändert. Wo früher Fabriken standen, gab es jetzt Wohnungen, Cafés und einen Park am Fluss. Viele der alten Bewohner konnten sich die Mieten nicht mehr leisten und zogen an den Stadtrand, während junge Familien aus dem ganzen Land
"""

# (module, attribute) pairs: their docstrings become prose, their source the code prompts.
STDLIB_DOCS = [
    ("json", "dumps"),
    ("json", "loads"),
    ("os.path", "join"),
    ("os", "makedirs"),
    ("shutil", "copytree"),
    ("collections", "Counter"),
    ("collections", "namedtuple"),
    ("functools", "lru_cache"),
    ("functools", "reduce"),
    ("textwrap", "dedent"),
    ("textwrap", "wrap"),
    ("random", "shuffle"),
    ("random", "choice"),
    ("statistics", "median"),
    ("statistics", "stdev"),
    ("datetime", "timedelta"),
    ("argparse", "ArgumentParser"),
    ("logging", "basicConfig"),
    ("subprocess", "run"),
    ("heapq", "heappush"),
    ("bisect", "insort_right"),
    ("fractions", "Fraction"),
    ("decimal", "Decimal"),
    ("pathlib", "Path"),
    ("csv", "DictReader"),
    ("string", "capwords"),
    ("difflib", "SequenceMatcher"),
    ("calendar", "isleap"),
    ("base64", "b64encode"),
    ("zipfile", "ZipFile"),
    ("tempfile", "mkstemp"),
    ("glob", "glob"),
    ("fnmatch", "fnmatch"),
    ("contextlib", "contextmanager"),
    ("dataclasses", "dataclass"),
    ("enum", "Enum"),
    ("typing", "NamedTuple"),
    ("uuid", "uuid4"),
    ("hashlib", "file_digest"),
]
STDLIB_CODE = [
    ("textwrap", "dedent"),
    ("statistics", "median"),
    ("statistics", "mean"),
    ("shlex", "quote"),
    ("heapq", "nlargest"),
    ("calendar", "isleap"),
    ("calendar", "leapdays"),
    ("fnmatch", "fnmatch"),
    ("fnmatch", "filter"),
    ("string", "capwords"),
    ("random", "Random.shuffle"),
    ("random", "Random.choice"),
    ("glob", "glob"),
    ("shutil", "which"),
    ("textwrap", "indent"),
    ("fractions", "Fraction.limit_denominator"),
    ("statistics", "mode"),
    ("json", "dumps"),
    ("base64", "b64encode"),
    ("colorsys", "rgb_to_hsv"),
    ("colorsys", "hsv_to_rgb"),
    ("difflib", "get_close_matches"),
    ("inspect", "getdoc"),
    ("html", "escape"),
    ("copy", "deepcopy"),
    ("contextlib", "suppress"),
    ("tempfile", "gettempdir"),
    ("uuid", "uuid4"),
    ("quopri", "ishex"),
]


def _lines(block: str) -> list[str]:
    return [line.replace("\\n", "\n") for line in block.splitlines() if line.strip()]


def _resolve(module: str, attr: str):
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _stdlib_source(module: str, attr: str) -> str:
    path = Path(inspect.getsourcefile(importlib.import_module(module)))
    lib = Path(inspect.getsourcefile(json)).parents[1]
    ver = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return f"CPython {ver} Lib/{path.relative_to(lib)} ({attr}), PSF License 2.0"


def _numbers_generated(rng: random.Random) -> list[str]:
    out = []
    for _ in range(10):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        out.append(f"{a} + {b} =")
    for _ in range(5):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        out.append(f"What is {a} times {b}? The answer is")
    for _ in range(5):
        start, step = rng.randint(1, 20), rng.randint(2, 9)
        out.append(", ".join(str(start + step * i) for i in range(5)) + ",")
    for _ in range(5):
        y = rng.randint(1700, 2020)
        out.append(
            f"In {y}, the population of the town was {rng.randint(1000, 90000):,}; by {y + 10} it had"
        )
    return out


def build() -> list[dict]:
    rows: list[dict] = []

    def add(kind: str, lang: str, text: str, source: str = PROJECT) -> None:
        rows.append(
            dict(
                id=f"{kind}-{sum(r['kind'] == kind for r in rows) + 1:03d}",
                kind=kind,
                lang=lang,
                source=source,
                text=text,
            )
        )

    for text in _lines(PROSE):
        add("prose", "en", text)
    for text in _lines(DIALOGUE):
        add("dialogue", "en", text)
    for text in _lines(FACTUAL):
        add("factual", "en", text)
    for text in _lines(NUMBERS) + _numbers_generated(random.Random(0)):
        add("numbers", "en", text)
    for text in _lines(LISTS):
        add("list", "en", text)
    for lang, block in LANGUAGES.items():
        for text in _lines(block):
            add("multilingual", lang, text)
    for text in _lines(CODE):
        add("code", "code", text)
    for text in _lines(LONG):
        add(
            "long",
            "fr" if text.startswith("Le ") else "de" if text.startswith("Die ") else "en",
            text,
        )
    for module, attr in STDLIB_DOCS:
        doc = inspect.getdoc(_resolve(module, attr)) or ""
        para = doc.split("\n\n")[0].replace("\n", " ").strip()
        if len(para) >= 40:
            add("docstring", "en", para[:600], _stdlib_source(module, attr))
    for module, attr in STDLIB_CODE:
        src = inspect.getsource(_resolve(module, attr))
        lines = textwrap.dedent(src).splitlines()[:14]
        add("code", "code", "\n".join(lines), _stdlib_source(module, attr))
    return rows


if __name__ == "__main__":
    rows = build()
    texts = [r["text"] for r in rows]
    assert len(set(texts)) == len(texts), "duplicate prompts"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    print(f"{len(rows)} prompts -> {OUT}: {kinds}")
