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
    for name in ('SparsifyCallback', 'Sparsifier', 'agp', 'one_shot', 'iterative', 'get_granularity', 'digits_dls', 'lenet_300_100'):
        assert name in ns, name


def test_core_does_not_import_fastai():
    "schedules, criteria, granularity and sparsifier are plain PyTorch"
    for mod in ('schedules', 'criteria', 'granularity', 'sparsifier'):
        src = (ROOT / 'fasterprune' / f'{mod}.py').read_text()
        assert not re.search(r'^\s*(import|from)\s+fastai\b', src, flags=re.M), mod
