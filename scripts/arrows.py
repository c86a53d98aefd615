#!/usr/bin/env python3
"""Import arrows between tokenrelay's modules (issue #18): which module uses
which, counting `crate::x` paths outside `#[cfg(test)] mod tests` and
outside comments, and with --depth 2 the submodules (`api::pci`) and their
`super::` siblings.

    python3 scripts/arrows.py src [--depth 2]

Prints each arrow A -> B with its count, then the circles A <-> B ("none"
when every arrow goes one way).
"""
import os, re, sys
from collections import Counter
src = sys.argv[1]
depth = int(sys.argv[sys.argv.index('--depth') + 1]) if '--depth' in sys.argv else 1
def module_of(path):
    rel = os.path.relpath(path, src)[:-3].split(os.sep)
    if rel[-1] == 'mod': rel = rel[:-1]
    if rel in (['lib'], ['main']): return rel[0]
    return '::'.join(rel[:depth])
def strip_tests(text):
    m = re.search(r'#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*mod tests', text)
    text = text[:m.start()] if m else text
    return re.sub(r'//[^\n]*', '', text)  # comments name modules without importing them
arrows = Counter()
use_re = re.compile(r'crate::([a-z_]+)(?:::([a-z_]+))?')
for root, _, files in os.walk(src):
    for f in files:
        if not f.endswith('.rs'): continue
        p = os.path.join(root, f)
        if os.path.relpath(p, src).startswith('bin'): continue
        a = module_of(p)
        for m in use_re.finditer(strip_tests(open(p).read())):
            b = m.group(1)
            if depth == 2 and m.group(2) and os.path.exists(os.path.join(src, b, m.group(2) + '.rs')):
                b = b + '::' + m.group(2)
            if b != a and not a.startswith(b + '::') and not b.startswith(a + '::'):
                arrows[(a, b)] += 1
        if depth == 2 and '::' in a:
            # siblings inside a module: `super::x` from src/m/y.rs is m::x
            parent = a.split('::')[0]
            for m in re.finditer(r'super::\{?([a-z_, ]+)', strip_tests(open(p).read())):
                for name in re.findall(r'[a-z_]+', m.group(1)):
                    b = f'{parent}::{name}'
                    if b != a and os.path.exists(os.path.join(src, parent, name + '.rs')):
                        arrows[(a, b)] += 1
for (a, b), n in sorted(arrows.items()):
    print(f'{a} -> {b} ({n})')
circles = sorted({tuple(sorted((a, b))) for (a, b) in arrows if (b, a) in arrows})
print('\ncircles:', ', '.join(f'{a}<->{b}' for a, b in circles) or 'none')
