#!/usr/bin/env python3
"""The house rules that the compiler does not check (ARCHITECTURE.md, "Layout"):

- no source file over 700 lines, in src/, tests/ and examples/;
- no import circle between files, in src/ and in tests/: a `use crate::…` / `super::…` /
  child-module path from file A to file B and back, through any chain (re-exports are
  followed to the file that defines the item, so a folder's mod.rs listing its parts is
  not a circle). In tests/, each folder but common/ is a test binary whose root is its
  main.rs, and `common` (the harness every binary takes in with #[path]) is tests/common/;
- dependencies point down: registry, cache and image never import fs, mount, fuse or
  runtime; registry imports neither cache nor image; fs never imports fuse, mount or runtime.

Prints what it finds and exits 1 if a rule is broken. `--graph` prints every edge.
"""
import os
import re
import sys

MAX_LINES = 700
ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
SRC = os.path.join(ROOT, "src")
TESTS = os.path.join(ROOT, "tests")
EXAMPLES = os.path.join(ROOT, "examples")
# In tests/: the harness every test binary takes in as `mod common`.
HARNESS = "common"
# module (first component under crate) -> modules it must never import
FORBIDDEN = {
    "registry": {"fs", "mount", "fuse", "runtime", "cache", "image"},
    "cache": {"fs", "mount", "fuse", "runtime", "image"},
    "image": {"fs", "mount", "fuse", "runtime"},
    "buf": {"fs", "mount", "fuse", "runtime", "cache", "image", "registry"},
    "fs": {"fuse", "mount", "runtime"},
    "fuse": {"mount", "runtime"},
}


# A path spelled in code, and `::{` when it is a use tree's head (the use's own paths say
# which items it takes).
SPELLED_PATH = r"\b((?:crate|super)(?:::\w+)+)(::\{)?"


def module_of(path, base=SRC):
    """src/a/b.rs -> ('a','b'); src/a/mod.rs -> ('a',); src/lib.rs -> ();
    tests/e2e/main.rs -> ('e2e',); tests/common/mod.rs -> ('common',)."""
    rel = os.path.relpath(path, base)[:-3].split(os.sep)
    if rel[-1] in ("mod", "lib", "main"):
        rel = rel[:-1]
    return tuple(rel)


def rust_files(base):
    for root, _, names in os.walk(base):
        for n in sorted(names):
            if n.endswith(".rs"):
                yield os.path.join(root, n)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return re.sub(r"//[^\n]*", "", text)


def expand_use_tree(tree):
    """'a::{b, c::{d, e}}' -> ['a::b', 'a::c::d', 'a::c::e'] (aliases dropped)."""
    tree = re.sub(r"\s+as\s+\w+", "", tree)
    tree = re.sub(r"\s+", "", tree)
    out = []

    def walk(prefix, s):
        i = s.find("{")
        if i < 0:
            out.append(prefix + s)
            return
        head = s[:i]
        body = s[i + 1 : s.rfind("}")]
        depth, start = 0, 0
        parts = []
        for j, ch in enumerate(body):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                parts.append(body[start:j])
                start = j + 1
        parts.append(body[start:])
        for p in parts:
            if p:
                walk(prefix + head, p)

    walk("", tree)
    return out


def main():
    src_problems, src_edges, src_files = analyse(SRC, crate_of=lambda m: ())
    test_problems, test_edges, test_files = analyse(TESTS, crate_of=test_crate_of)
    problems = src_problems + test_problems
    for p in rust_files(EXAMPLES):
        problems += too_long(p)

    if "--graph" in sys.argv:
        for edges in (src_edges, test_edges):
            for m in sorted(edges):
                for t in sorted(edges[m]):
                    print(f"{name(m)} -> {name(t)}")
    for p in problems:
        print(p)
    for base, files, edges in ((SRC, src_files, src_edges), (TESTS, test_files, test_edges)):
        big = sorted(((lines(p), p) for p in files.values()), reverse=True)[:5]
        where = os.path.relpath(base, ROOT)
        print(f"{where}/: largest files: "
              + ", ".join(f"{os.path.relpath(p, base)} {n}" for n, p in big))
        print(f"{where}/: {len(files)} files, {sum(len(e) for e in edges.values())} import "
              f"edges, {sum(1 for s in strongly_connected(edges) if len(s) > 1)} circles")
    sys.exit(1 if problems else 0)


def test_crate_of(m):
    """The crate root a file of tests/ speaks of as `crate`: its binary's folder. The
    harness is compiled into every binary; it names itself `crate::common`."""
    return () if not m or m[0] == HARNESS else (m[0],)


def lines(path):
    with open(path) as f:
        return sum(1 for _ in f)


def too_long(path):
    n = lines(path)
    if n > MAX_LINES:
        return [f"{os.path.relpath(path, ROOT)}: {n} lines (most {MAX_LINES})"]
    return []


def analyse(base, crate_of):
    """(problems, import edges, files) of the tree under `base`."""
    files = {module_of(p, base): p for p in rust_files(base)}
    if ("",) in files:
        del files[("",)]
    texts = {m: strip_comments(open(p).read()) for m, p in files.items()}
    children = {m: set() for m in files}
    for m in files:
        if m:
            children.setdefault(m[:-1], set()).add(m[-1])

    def absolute_in(m, segs):
        path = absolute(m, segs, children, crate_of(m))
        # `crate::common::…` or a bare `common::…` (after `use crate::common;`) in a test
        # binary is the harness.
        if base == TESTS and path is not None:
            if len(path) > 1 and crate_of(m) and path[0] == crate_of(m)[0] and path[1] == HARNESS:
                return path[1:]
            if segs and segs[0] == HARNESS:
                return list(segs)
        elif base == TESTS and segs and segs[0] == HARNESS:
            return list(segs)
        return path

    # `pub use x::Y` in a module: Y -> full path, to follow re-exports.
    reexports = {}
    for m, t in texts.items():
        for tree in re.findall(r"\bpub(?:\([^)]*\))?\s+use\s+([^;]+);", t):
            for p in expand_use_tree(tree):
                segs = p.split("::")
                reexports.setdefault(m, {})[segs[-1]] = absolute_in(m, segs)

    def resolve(segs, seen=0):
        """Longest module prefix that is a file; follow a re-export of the next name."""
        if segs is None:
            return None
        for k in range(len(segs), -1, -1):
            mod = tuple(segs[:k])
            if mod in files:
                rest = segs[k:]
                target = reexports.get(mod, {}).get(rest[0]) if rest else None
                if target and seen < 8 and list(target) != list(mod) + rest[:1]:
                    return resolve(list(target) + rest[1:], seen + 1)
                return mod
        return None

    edges = {m: set() for m in files}
    for m, t in texts.items():
        # An inline module (`mod tests { use super::*; }`) speaks for its file: its
        # `super` is the file itself.
        for inner, block in split_inline_modules(m, t):
            paths = []
            for tree in re.findall(r"\buse\s+([^;]+);", block):
                paths += [p.split("::") for p in expand_use_tree(tree)]
            # Paths in code (`crate::a::f()`); a use tree's `crate::a::{…}` is the use's.
            paths += [p.split("::") for p, tree in re.findall(SPELLED_PATH, block) if not tree]
            for segs in paths:
                target = resolve(absolute_in(inner, segs))
                if target is not None and target != m and target != ():
                    edges[m].add(target)

    problems = []
    for m, p in sorted(files.items()):
        problems += too_long(p)
    if base == SRC:
        for m, targets in sorted(edges.items()):
            for t in sorted(targets):
                if m and t and t[0] in FORBIDDEN.get(m[0], ()):
                    problems.append(f"layer: {name(m)} imports {name(t)}")
    for scc in strongly_connected(edges):
        if len(scc) > 1:
            where = os.path.relpath(base, ROOT)
            problems.append(f"circle in {where}/: " + " <-> ".join(sorted(name(x) for x in scc)))
    return problems, edges, files


def absolute(m, segs, children, crate=()):
    segs = [s for s in segs if s]
    if not segs:
        return None
    if segs[0] == "crate":
        return list(crate) + segs[1:]
    if segs[0] == "self":
        return list(m) + segs[1:]
    if segs[0] == "super":
        base = list(m)
        while segs and segs[0] == "super":
            base = base[:-1]
            segs = segs[1:]
        return base + segs
    if segs[0] in children.get(m, ()):  # a child module used by its bare name
        return list(m) + segs
    return None  # another crate or std


def split_inline_modules(m, text):
    """[(module path, text)]: the file outside inline `mod x { … }` blocks, and each block
    with the path m + (x,), so that its `super::` names the file."""
    out, rest, pos = [], [], 0
    for match in re.finditer(r"\bmod\s+(\w+)\s*\{", text):
        if match.start() < pos:
            continue
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        rest.append(text[pos : match.start()])
        out.append((m + (match.group(1),), text[match.end() : i - 1]))
        pos = i
    rest.append(text[pos:])
    return [(m, "".join(rest))] + out


def name(m):
    return "::".join(m) or "crate"


def strongly_connected(edges):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            out.append(scc)

    for v in edges:
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    main()
