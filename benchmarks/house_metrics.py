"""How the package reads (issue 14): line lengths, joined statements, function lengths, @patch on our own classes.

    python benchmarks/house_metrics.py [--top 10]

Counts the generated package `fasterprune/*.py` (what users import), `_modidx.py` excluded.
"""
import argparse, ast, re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / 'fasterprune'


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--top', type=int, default=8)
    a = p.parse_args()
    files = sorted(f for f in PKG.glob('*.py') if f.name != '_modidx.py')
    own = set()
    lines = over120 = over150 = semis = 0
    funcs, patches = [], {}
    for f in files:
        src = f.read_text()
        tree = ast.parse(src)
        own |= {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        for ln in src.splitlines():
            lines += 1
            over120 += len(ln) > 120
            over150 += len(ln) > 150
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((n.end_lineno - n.lineno + 1, f'{f.name}:{n.lineno} {n.name}'))
                if any(isinstance(d, ast.Name) and d.id == 'patch' for d in n.decorator_list) and n.args.args:
                    ann = n.args.args[0].annotation
                    cls = ann.id if isinstance(ann, ast.Name) else '?'
                    patches[cls] = patches.get(cls, 0) + 1
        # statements joined by ';' on one line (outside strings and comments)
        for node in ast.walk(tree):
            body = getattr(node, 'body', None)
            if isinstance(body, list):
                seen = {}
                for s in body:
                    seen.setdefault(s.lineno, []).append(s)
                semis += sum(len(v) - 1 for v in seen.values())
    funcs.sort(reverse=True)
    own_patches = {k: v for k, v in patches.items() if k in own}
    print(f"files {len(files)}, lines {lines}")
    print(f"lines > 120 chars: {over120} ({over120 / lines:.1%}); > 150: {over150}")
    print(f"statements joined on one line: {semis}")
    print(f"functions: {len(funcs)}; over 50 lines: {sum(n > 50 for n, _ in funcs)}; longest:")
    for n, where in funcs[:a.top]: print(f"  {n:4d}  {where}")
    print(f"@patch methods on the library's own classes: {sum(own_patches.values())} {own_patches}")


if __name__ == '__main__': main()
