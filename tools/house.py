import ast, pathlib, sys, collections
root = pathlib.Path("src/lowbit")
mods = {}
for f in root.rglob("*.py"):
    rel = f.relative_to("src").with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__": parts = parts[:-1]
    mods[".".join(parts)] = f
edges = collections.defaultdict(set)
private, long_fns, target_cmp = [], [], []
for name, f in mods.items():
    tree = ast.parse(f.read_text())
    pkg = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("lowbit"):
                for a in node.names:
                    full = f"{mod}.{a.name}"
                    tgt = full if full in mods else mod
                    if tgt in mods and tgt != name: edges[name].add(tgt)
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        private.append(f"{f}:{node.lineno} {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lowbit") and a.name in mods and a.name != name: edges[name].add(a.name)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > 80: long_fns.append((n, f"{f}:{node.lineno} {node.name}"))
        if isinstance(node, ast.Compare):
            for c in [node.left, *node.comparators]:
                if isinstance(c, ast.Constant) and c.value in ("trt", "ort", "qdq"):
                    target_cmp.append(f"{f}:{node.lineno}")
                if isinstance(c, (ast.Tuple, ast.Set, ast.List)) and any(isinstance(e, ast.Constant) and e.value in ("trt","ort") for e in c.elts):
                    target_cmp.append(f"{f}:{node.lineno}")
# package __init__ edges: importing lowbit.x.y implies lowbit.x init; ignore
# SCCs
index, low, stack, on, sccs, i = {}, {}, [], set(), [], [0]
sys.setrecursionlimit(10000)
def sc(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in edges[v]:
        if w not in index: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: sccs.append(comp)
for v in list(mods):
    if v not in index: sc(v)
print("import circles (SCCs):", len(sccs))
for c in sccs: print("  ", sorted(c))
print("private names imported across modules:", len(private))
for p in private: print("  ", p)
print("target names compared in files:", len({t.split(':')[0] for t in target_cmp}))
for t in target_cmp: print("  ", t)
print("functions over 80 lines:")
for n, s in sorted(long_fns, reverse=True): print(f"   {n:4d} {s}")
