"""Builds the agent suite's SQLite database (deterministic: a seeded generator), into a path given on the
command line or by :func:`build`. The documents are the markdown files in docs/."""
import random
import sqlite3
import sys
from pathlib import Path

CITIES = ["Utrecht", "Eindhoven", "Tilburg", "Antwerp", "Cologne", "Lille", "Ghent"]
FIRST = ["Anna", "Bram", "Chloe", "Daan", "Eva", "Finn", "Greta", "Hugo", "Iris", "Jonas", "Lotte", "Milan",
         "Noor", "Otto", "Pien", "Ruben", "Sara", "Tijn", "Vera", "Wout"]
LAST = ["de Vries", "Jansen", "Bakker", "Visser", "Smit", "Meijer", "Mulder", "Bos", "Peters", "Hendriks"]
PRODUCTS = [("Fjellvind jacket", "jackets", 189.0), ("Softshell Mistral", "jackets", 129.0),
            ("Ridge 2 tent", "tents", 249.0), ("Dune 3 tent", "tents", 329.0), ("Basecamp 4 tent", "tents", 459.0),
            ("Down bag -5", "sleeping bags", 219.0), ("Summer bag +10", "sleeping bags", 89.0),
            ("Trail 30 backpack", "backpacks", 99.0), ("Expedition 65 backpack", "backpacks", 239.0),
            ("Leather hiker boots", "footwear", 179.0), ("Trail runner", "footwear", 129.0),
            ("Merino base layer", "clothing", 59.0), ("Fleece midlayer", "clothing", 69.0),
            ("Rain trousers", "clothing", 79.0), ("Camp stove", "equipment", 49.0), ("Titanium mug", "equipment", 24.0)]


def build(path: str | Path) -> Path:
    path = Path(path)
    if path.exists():
        path.unlink()
    rng = random.Random(2026)
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL, member INTEGER NOT NULL);
        CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL, price REAL NOT NULL);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                             order_date TEXT NOT NULL, status TEXT NOT NULL);
        CREATE TABLE order_items (order_id INTEGER NOT NULL REFERENCES orders(id),
                                  product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL);
    """)
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(names)
    custs = [(i + 1, names[i], rng.choice(CITIES), int(rng.random() < 0.4)) for i in range(60)]
    db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?)", custs)
    db.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", [(i + 1, *p) for i, p in enumerate(PRODUCTS)])
    oid = 0
    for month in range(1, 7):
        for _ in range(rng.randint(25, 40)):
            oid += 1
            day = rng.randint(1, 28)
            status = rng.choices(["delivered", "shipped", "returned", "cancelled"], [70, 15, 10, 5])[0]
            db.execute("INSERT INTO orders VALUES (?, ?, ?, ?)",
                       (oid, rng.randint(1, 60), f"2026-{month:02d}-{day:02d}", status))
            for pid in rng.sample(range(1, len(PRODUCTS) + 1), rng.randint(1, 3)):
                db.execute("INSERT INTO order_items VALUES (?, ?, ?)", (oid, pid, rng.randint(1, 3)))
    db.commit()
    db.close()
    return path


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "shop.sqlite"))
