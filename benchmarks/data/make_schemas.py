"""Writes schemas50.json: the structured-output test set (50 schemas with a prompt each), kept as Python here
for readability. Run once; the JSON is what tests and benchmarks/structured_output.py read."""
import json
from pathlib import Path

S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(props, required=None, extra=False):
    o = {"type": "object", "properties": props, "required": list(props) if required is None else required}
    if not extra:
        o["additionalProperties"] = False
    return o


def arr(items, lo=None, hi=None):
    a = {"type": "array", "items": items}
    if lo is not None:
        a["minItems"] = lo
    if hi is not None:
        a["maxItems"] = hi
    return a


def enum(*v):
    return {"type": "string", "enum": list(v)}


CASES = [
    ("person", "Describe a fictional person.", obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("book", "Recommend a classic novel.", obj({"title": S, "author": S, "year": I, "genres": arr(S, 1, 4)})),
    ("weather", "Report today's weather in Oslo.", obj({"city": S, "temp_c": N, "condition": enum("sunny", "cloudy", "rain", "snow")})),
    ("todo", "Make a to-do list for moving house.", obj({"items": arr(obj({"task": S, "done": B}), 2, 5)})),
    ("point", "Give a point in 3D space.", obj({"x": N, "y": N, "z": N})),
    ("color", "Pick a color.", obj({"name": S, "rgb": arr({"type": "integer", "minimum": 0, "maximum": 255}, 3, 3)})),
    ("address", "Write a postal address.", obj({"street": S, "city": S, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "country": S})),
    ("order", "Create an online shop order.", obj({"id": I, "customer": obj({"name": S, "email": S}), "lines": arr(obj({"sku": S, "qty": {"type": "integer", "minimum": 1}, "price": {"type": "number", "minimum": 0}}), 1, 3), "paid": B})),
    ("sentiment", "Classify: 'I loved this film, best of the year!'", obj({"label": enum("positive", "negative", "neutral"), "confidence": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("entities", "Extract named entities from: 'Marie Curie worked in Paris at the Sorbonne.'", obj({"people": arr(S, 0, 5), "places": arr(S, 0, 5), "organizations": arr(S, 0, 5)})),
    ("recipe", "Give a simple pancake recipe.", obj({"name": S, "servings": {"type": "integer", "minimum": 1, "maximum": 12}, "ingredients": arr(obj({"item": S, "amount": S}), 2, 6), "steps": arr(S, 2, 6)})),
    ("optional_fields", "Describe a laptop.", obj({"brand": S, "model": S, "ram_gb": I, "gpu": S, "weight_kg": N}, required=["brand", "model"])),
    ("nullable", "Describe a pet, if you have one.", obj({"species": {"type": ["string", "null"]}, "name": {"type": ["string", "null"]}, "age": {"type": ["integer", "null"]}})),
    ("tree", "Describe a small family tree.", obj({"name": S, "children": arr(obj({"name": S, "children": arr(obj({"name": S}), 0, 2)}), 0, 3)})),
    ("matrix", "Give a 2x2 matrix of integers.", obj({"rows": arr(arr(I, 2, 2), 2, 2)})),
    ("event", "Plan a meeting.", obj({"title": S, "date": {"type": "string", "format": "date"}, "attendees": arr(S, 1, 5), "online": B})),
    ("timestamps", "Log an event time.", obj({"event": S, "at": {"type": "string", "format": "date-time"}})),
    ("uuid_email", "Create a user account.", obj({"id": {"type": "string", "format": "uuid"}, "email": {"type": "string", "format": "email"}, "admin": B})),
    ("const", "Report status ok.", obj({"version": {"const": 2}, "status": {"const": "ok"}, "detail": S}, required=["version", "status"])),
    ("anyof", "Give either a number or a word.", obj({"value": {"anyOf": [I, {"type": "string", "maxLength": 10}]}})),
    ("oneof_shape", "Describe a shape.", {"oneOf": [obj({"kind": {"const": "circle"}, "radius": {"type": "number", "minimum": 0}}), obj({"kind": {"const": "rect"}, "w": N, "h": N})]}),
    ("refs", "Describe two friends.", {"$defs": {"p": obj({"name": S, "age": I})}, "type": "object", "properties": {"a": {"$ref": "#/$defs/p"}, "b": {"$ref": "#/$defs/p"}}, "required": ["a", "b"], "additionalProperties": False}),
    ("ints_bounds", "Roll three dice.", obj({"dice": arr({"type": "integer", "minimum": 1, "maximum": 6}, 3, 3), "total": {"type": "integer", "minimum": 3, "maximum": 18}})),
    ("neg_numbers", "Give a temperature forecast for a cold week.", obj({"days": arr(obj({"day": enum("mon", "tue", "wed", "thu", "fri", "sat", "sun"), "low": {"type": "number", "maximum": 0}, "high": N}), 1, 7)})),
    ("exclusive", "Give a probability strictly between 0 and 1.", obj({"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}})),
    ("string_len", "Suggest a username.", obj({"username": {"type": "string", "minLength": 3, "maxLength": 16}, "display": {"type": "string", "maxLength": 40}})),
    ("pattern_code", "Invent a product code.", obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "name": S})),
    ("bool_flags", "Describe feature flags.", obj({"dark_mode": B, "beta": B, "telemetry": B})),
    ("top_array", "List three fruits.", arr(S, 3, 3)),
    ("top_array_objs", "List two cities with population.", arr(obj({"city": S, "population": {"type": "integer", "minimum": 0}}), 1, 4)),
    ("enum_numbers", "Pick an HTTP status.", obj({"status": {"enum": [200, 201, 400, 404, 500]}, "reason": S})),
    ("mixed_enum", "Pick a setting.", obj({"level": {"enum": ["low", "high", 1, 2, None]}})),
    ("deep", "Describe a company org chart.", obj({"company": obj({"name": S, "ceo": obj({"name": S, "reports": arr(obj({"name": S, "title": S}), 1, 3)})})})),
    ("invoice", "Create an invoice.", obj({"number": S, "items": arr(obj({"desc": S, "qty": I, "unit": N}), 1, 4), "subtotal": N, "tax_rate": {"type": "number", "minimum": 0, "maximum": 0.5}, "total": N})),
    ("qa", "Answer: what is the capital of France?", obj({"answer": S, "sources": arr(S, 0, 3)})),
    ("classification_multi", "Tag the text 'new GPU released with faster ray tracing'.", obj({"tags": arr(enum("tech", "sports", "politics", "science", "gaming"), 1, 3)})),
    ("math", "Solve 12 * 7.", obj({"expression": S, "result": N, "steps": arr(S, 0, 4)})),
    ("translation", "Translate 'good morning' to French and Spanish.", obj({"fr": S, "es": S})),
    ("sql_plan", "Plan an SQL query listing customers by revenue.", obj({"tables": arr(S, 1, 3), "columns": arr(S, 1, 5), "order_by": S, "limit": {"type": "integer", "minimum": 1, "maximum": 100}})),
    ("api_call", "Call an API to get user 42.", obj({"method": enum("GET", "POST", "PUT", "DELETE"), "path": {"type": "string", "pattern": "^/[a-z0-9/]*$"}, "headers": obj({"accept": S}, required=[])})),
    ("coords", "Give the coordinates of a famous landmark.", obj({"name": S, "lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180, "maximum": 180}})),
    ("schedule", "Make a weekly gym schedule.", obj({"sessions": arr(obj({"day": S, "minutes": {"type": "integer", "minimum": 10, "maximum": 120}, "focus": enum("cardio", "strength", "mobility")}), 2, 5)})),
    ("review", "Review a restaurant.", obj({"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "pros": arr(S, 0, 3), "cons": arr(S, 0, 3), "recommend": B})),
    ("free_object", "Describe a car with any attributes.", {"type": "object", "properties": {"make": S}, "required": ["make"]}),
    ("map_values", "Give word counts for a sentence.", {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}, "maxProperties": 5}),
    ("list_of_lists", "Group numbers 1 to 6 into pairs.", obj({"pairs": arr(arr(I, 2, 2), 1, 3)})),
    ("multiple_of", "Give a price in quarter units.", obj({"price": {"type": "number", "multipleOf": 0.25, "minimum": 0, "maximum": 100}})),
    ("version", "Give a software version.", obj({"version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$"}, "stable": B})),
    ("chat_turns", "Write a two-turn dialogue.", obj({"turns": arr(obj({"speaker": enum("A", "B"), "text": {"type": "string", "maxLength": 80}}), 2, 4)})),
    ("nested_optional", "Describe a user profile.", obj({"user": obj({"name": S, "bio": S, "links": arr(obj({"label": S, "url": S}), 0, 3)}, required=["name"]), "settings": obj({"theme": enum("light", "dark"), "lang": S}, required=[])}, required=["user"])),
]

if __name__ == "__main__":
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)
    out = [{"name": n, "prompt": p + " Answer in JSON.", "schema": s} for n, p, s in CASES]
    tmp = Path(__file__).with_name("schemas50.json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    tmp.replace(Path(__file__).with_name("schemas50.json"))
    print(len(out), "schemas")
