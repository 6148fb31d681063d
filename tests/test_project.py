"Project invariants: settings.ini and pyproject.toml agree, the public API is importable"
import configparser, re, tomllib
from pathlib import Path
import fastcore.test as fct

ROOT = Path(__file__).resolve().parents[1]


def _meta():
    ini = configparser.ConfigParser(); ini.read(ROOT / 'settings.ini'); ini = ini['DEFAULT']
    pp = tomllib.loads((ROOT / 'pyproject.toml').read_text())
    return ini, pp


def test_settings_ini_matches_pyproject():
    ini, pp = _meta()
    proj, nb = pp['project'], pp['tool']['nbdev']
    fct.test_eq(ini['lib_name'], proj['name'])
    fct.test_eq(ini['description'], proj['description'])
    fct.test_eq(ini['keywords'].split(), proj['keywords'])
    fct.test_eq(ini['author'], proj['authors'][0]['name'])
    fct.test_eq(ini['author_email'], proj['authors'][0]['email'])
    fct.test_eq(ini['license'], proj['license'])
    fct.test_eq('>=' + ini['min_python'], proj['requires-python'])
    fct.test_eq(ini['git_url'], proj['urls']['Repository'])
    fct.test_eq(ini['lib_path'], nb['lib_path'])
    fct.test_eq(ini['nbs_path'], nb['nbs_path'])
    fct.test_eq(ini['tst_flags'], nb['tst_flags'])


def test_version_agrees():
    import fasterprune
    ini, _ = _meta()
    fct.test_eq(fasterprune.__version__, ini['version'])


def test_all_gives_public_api():
    ns = {}
    exec('from fasterprune.all import *', ns)
    for name in ('SparsifyCallback', 'Sparsifier', 'agp', 'one_shot', 'iterative', 'get_granularity', 'digits_dls', 'lenet_300_100', 'conv1d_to_linear', 'hf_heads',
                 'sensitivity', 'targets_from_sensitivity', 'DistillCallback', 'kd_loss'):
        assert name in ns, name


def test_core_does_not_import_fastai():
    "schedules, criteria, granularity and sparsifier are plain PyTorch"
    for mod in ('schedules', 'criteria', 'granularity', 'sparsifier'):
        src = (ROOT / 'fasterprune' / f'{mod}.py').read_text()
        assert not re.search(r'^\s*(import|from)\s+fastai\b', src, flags=re.M), mod


def test_plain_pytorch_modules_do_not_import_fastai():
    "The engine, metrics, graph, Pruner, rewinding and the sparse export work in plain PyTorch loops (DESIGN.md arrows)"
    for mod in ('core', 'metrics', 'graph', 'pruner', 'rewind', 'inference', 'sensitivity'):
        src = (ROOT / 'fasterprune' / f'{mod}.py').read_text()
        assert not re.search(r'^\s*(import|from)\s+fastai\b', src, flags=re.M), mod


def test_no_links_to_a_docs_site_nothing_builds():
    "quarto cannot be installed here, so no docs site is published: modules and metadata must not point to one"
    pp = tomllib.loads((ROOT / 'pyproject.toml').read_text())
    assert 'Documentation' not in pp['project'].get('urls', {})
    for f in (ROOT / 'fasterprune').glob('*.py'):
        assert 'github.io' not in f.read_text(), f.name


def _local_links(md: str):
    return [t for t in re.findall(r'\]\(([^)\s]+)\)', md) if not re.match(r'[a-z]+://|#', t)]


def test_relative_links_resolve():
    "Links in the README and between notebooks point to files that exist"
    import json
    for link in _local_links((ROOT / 'README.md').read_text()):
        assert (ROOT / link.split('#')[0]).exists(), f"README.md links to missing {link}"
    for nb in (ROOT / 'nbs').glob('*.ipynb'):
        md = '\n'.join(''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'markdown')
        for link in _local_links(md):
            assert (nb.parent / link.split('#')[0]).exists(), f"{nb.name} links to missing {link}"


def test_license_file_matches_declared_license():
    ini, pp = _meta()
    text = (ROOT / 'LICENSE').read_text()
    assert pp['project']['license'] == 'Apache-2.0' and 'Apache License' in text and 'Version 2.0' in text
