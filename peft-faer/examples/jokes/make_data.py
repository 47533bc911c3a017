"""Writes jokes.jsonl: the 283 English one-line programmer jokes of the
PyPI package pyjokes 0.8.3 (BSD-3-Clause, Copyright 2014- Pyjokes Society;
its licence is LICENCE-pyjokes.txt here), one chat record each:

    {"messages": [{"role": "user", "content": "Tell me a programming joke."},
                  {"role": "assistant", "content": JOKE}]}

The wheel is fetched with pip and read as a zip (nothing is imported):

    pip download --no-deps pyjokes==0.8.3 -d /tmp/pyjokes
    python make_data.py /tmp/pyjokes/pyjokes-0.8.3-py3-none-any.whl
"""
import ast
import json
import sys
import zipfile

wheel = zipfile.ZipFile(sys.argv[1])
tree = ast.parse(wheel.read("pyjokes/jokes_en.py").decode())
lists = {}
for node in tree.body:
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
        try:
            lists[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            pass
jokes = lists["neutral"] + lists["chuck"]
with open("LICENCE-pyjokes.txt", "wb") as f:
    f.write(wheel.read("pyjokes-0.8.3.dist-info/LICENCE.txt"))
with open("jokes.jsonl", "w") as f:
    for joke in jokes:
        record = {"messages": [
            {"role": "user", "content": "Tell me a programming joke."},
            {"role": "assistant", "content": joke},
        ]}
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
print(len(jokes), "jokes")
