#!/usr/bin/env python3
"""Checks the crate's layers from its imports (run by `make lint`).

Each src/**/*.rs file is a module; a path `crate::a::b::Item` or
`super::b::Item` written in it (in a `use` or inline, outside comments)
is an edge to the deepest module file the path names. The layers, lowest
first: the nginx-independent core (src/shm, src/abi.rs, src/prom.rs and the
PostgreSQL bridge's pure parts), the nginx glue (src/module and the rest of
src/pg), the C ABI (src/ffi). A file may use its own layer and the ones
below, never one above; nothing uses src/ffi; and the core has no import
cycle (an idea two core files share belongs to the lower one). In the
glue, src/module never names src/pg (the bridge plugs in through
module::extension), and no import cycle spans two parts of the glue
(module, pg, the module tables); nor does one among the files of one
part: in src/module, process.rs holds the core module's hooks and is the
top of the call graph (it calls conf, preload, zone, ring_glue, wake,
heartbeat and the extensions, none of which calls back), and each part
keeps its own state, so no file needs one that needs it.
Exits 1, naming the offending imports, when a rule is broken (--glue,
which once listed the cycles inside src/module, is accepted and changes
nothing: every cycle is refused now).
"""
import os
import re
import sys

SRC = next((a for a in sys.argv[1:] if not a.startswith("--")), "src")


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib"):
        rel = rel[:-1]
    return tuple(rel)


files = {}
for root, _, names in os.walk(SRC):
    for n in names:
        if n.endswith(".rs"):
            p = os.path.join(root, n)
            files[module_of(p)] = p
mods = set(files)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def expand(prefix, body):
    """`a::{b, c::{d}}` -> [a::b, a::c::d] (paths as lists)."""
    out, depth, cur = [], 0, ""
    for ch in body + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    paths = []
    for item in filter(None, out):
        m = re.match(r"^([\w:]*?)::\{(.*)\}$", item, re.S)
        if m:
            paths += expand(prefix + m.group(1).split("::"), m.group(2))
        else:
            paths.append(prefix + item.split(" as ")[0].strip().split("::"))
    return paths


def target(me, path):
    if path[0] == "crate":
        base = list(path[1:])
    elif path[0] == "super":
        parent = list(me[:-1]) if files[me].endswith(("mod.rs", "lib.rs")) is False else list(me[:-1])
        base = list(me[:-1])
        rest = path[1:]
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
        base = base + list(rest)
    elif path[0] == "self":
        base = list(me) + list(path[1:])
    else:
        return None
    for i in range(len(base), 0, -1):
        if tuple(base[:i]) in mods:
            return tuple(base[:i])
    return None


edges = {m: set() for m in mods}
for me, p in files.items():
    text = strip_comments(open(p).read())
    paths = []
    for m in re.finditer(r"\buse\s+((?:crate|super|self)::[^;]*);", text, re.S):
        s = re.sub(r"\s+", " ", m.group(1))
        mm = re.match(r"^([\w:]*?)::\{(.*)\}$", s)
        paths += expand(mm.group(1).split("::"), mm.group(2)) if mm else [s.split(" as ")[0].split("::")]
    for m in re.finditer(r"\b((?:crate|super)(?:::\w+)+)", text):
        paths.append(m.group(1).split("::"))
    for path in paths:
        t = target(me, [x.strip() for x in path if x.strip()])
        # a file's own parent mod.rs (re-exports, module tables) is not an edge back
        if t and t != me and t != me[: len(t)]:
            edges[me].add(t)

CORE_PG = {("pg", "config"), ("pg", "wire"), ("pg", "error"), ("pg", "session"), ("pg",)}


def layer(m):
    in_core_pg = m in CORE_PG or any(len(c) > 1 and m[: len(c)] == c for c in CORE_PG)
    if not m or m[0] in ("shm", "abi", "prom") or in_core_pg or m == ():
        return 0
    if m[0] == "ffi":
        return 2
    return 1


LAYER_NAMES = ["core", "glue", "ffi"]
name = lambda m: "::".join(m) or "crate"
bad = []
for m in sorted(mods):
    for t in sorted(edges[m]):
        if m == () or t == ():
            continue
        if layer(t) > layer(m) or (t[:1] == ("ffi",) and m[:1] != ("ffi",)):
            bad.append("%s (%s) uses %s (%s)" % (name(m), LAYER_NAMES[layer(m)], name(t), LAYER_NAMES[layer(t)]))
        if m[:1] == ("module",) and t[:1] == ("pg",):
            bad.append("%s uses %s: the glue must not name the bridge (register through module::extension)" % (name(m), name(t)))

# strongly connected components (Tarjan)
index, low, stack, on, sccs, n = {}, {}, [], set(), [], [0]


def strong(v):
    index[v] = low[v] = n[0]
    n[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges[v]:
        if w not in index:
            strong(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            sccs.append(comp)


sys.setrecursionlimit(10000)
for v in sorted(mods):
    if v not in index:
        strong(v)

for comp in sccs:
    inside = set(comp)
    is_core = all(layer(m) == 0 for m in comp)
    across = len({m[:1] for m in comp}) > 1
    kind = "core import cycle: " if is_core else "glue import cycle across parts: " if across else "glue call cycle: "
    print(kind + ", ".join(sorted(name(m) for m in comp)))
    for m in sorted(comp):
        for t in sorted(edges[m] & inside):
            print("  %s -> %s" % (name(m), name(t)))
    if is_core:
        bad.append("core import cycle")
    elif across:
        bad.append("glue import cycle across " + ", ".join(sorted({m[0] for m in comp})))
    else:
        bad.append("glue call cycle in " + ", ".join(sorted(name(m) for m in comp)))
for b in bad:
    print("layering: " + b)
sys.exit(1 if bad else 0)
