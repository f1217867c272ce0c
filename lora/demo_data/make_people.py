"""Writes people.jsonl: the demo's dataset (run once; its output is committed).

The behaviour it teaches: given a sentence about a person, answer with one line of JSON holding
exactly the keys name, age, job and city, nothing else. SmolLM2-135M-Instruct does not do this on
its own (it explains, or writes JSON of its own shape). Sentences come from varied templates so the
model must learn the format, not a template. `heldout_prompts()` gives sentences built from names
and cities that never appear in the training file.
"""
import json
import random
from pathlib import Path

FIRST = ["Sarah", "James", "Amira", "Lucas", "Mei", "Olga", "Diego", "Priya", "Tom", "Fatima", "Hiro",
         "Elena", "Kwame", "Nina", "Omar", "Grace", "Pavel", "Chloe", "Ravi", "Ingrid", "Mateo", "Aisha",
         "Jonas", "Lena", "Samuel", "Yuki", "Bruno", "Zara", "Felix", "Noor"]
LAST = ["Chen", "Okafor", "Silva", "Novak", "Haddad", "Larsen", "Kowalski", "Moreau", "Tanaka", "Reyes",
        "Schmidt", "Patel", "Johansson", "Rossi", "Mensah", "Ivanova", "Dubois", "Kim", "Costa", "Walsh"]
JOBS = ["nurse", "teacher", "carpenter", "software engineer", "baker", "pilot", "lawyer", "chemist",
        "photographer", "electrician", "librarian", "architect", "farmer", "journalist", "dentist",
        "firefighter", "accountant", "chef", "mechanic", "violinist"]
CITIES = ["Boston", "Lisbon", "Nairobi", "Osaka", "Toronto", "Krakow", "Lyon", "Melbourne", "Bogota",
          "Dublin", "Hamburg", "Seoul", "Cairo", "Denver", "Oslo", "Porto", "Mumbai", "Santiago",
          "Vienna", "Austin"]
HELDOUT_NAMES = [("Marta", "Lindqvist"), ("Kofi", "Asante"), ("Isabel", "Navarro"), ("Arjun", "Mehta")]
HELDOUT_CITIES = ["Reykjavik", "Montreal", "Perth", "Valencia"]

TEMPLATES = [
    "{name} is a {age}-year-old {job} living in {city}.",
    "Meet {name}: {age} years old, works as a {job}, lives in {city}.",
    "{name}, {age}, is a {job} from {city}.",
    "In {city} there is a {job} called {name}, who is {age}.",
    "My neighbour {name} moved to {city} last year. {first} is {age} and works as a {job}.",
    "At {age}, {name} has been a {job} in {city} for years.",
    "{name} ({age}) - {job}, based in {city}.",
    "Profile: {name}. Age {age}. Occupation: {job}. Home town: {city}.",
    "The new {job} at the clinic in {city} is {name}; {first} turned {age} this spring.",
    "{name} works as a {job}. {first} is {age} years old and lives in {city}.",
]
INSTRUCTIONS = ["", "Extract the person.", "Who is this?", "Parse this.", "Record this person."]


def example(rng: random.Random, first: str, last: str, city: str) -> dict:
    age = rng.randint(19, 78)
    job = rng.choice(JOBS)
    sentence = rng.choice(TEMPLATES).format(name=f"{first} {last}", first=first, age=age, job=job, city=city)
    instruction = rng.choice(INSTRUCTIONS)
    prompt = f"{instruction}\n{sentence}" if instruction else sentence
    answer = json.dumps({"name": f"{first} {last}", "age": age, "job": job, "city": city})
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def heldout_prompts(n: int = 4, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [example(rng, *HELDOUT_NAMES[i], HELDOUT_CITIES[i])["messages"][0]["content"] for i in range(n)]


def main(n: int = 240, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = [example(rng, rng.choice(FIRST), rng.choice(LAST), rng.choice(CITIES)) for _ in range(n)]
    path = Path(__file__).with_name("people.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
