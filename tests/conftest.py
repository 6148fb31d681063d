import os, pytest, torch

os.environ.setdefault('PYTHONHASHSEED', '0')
torch.set_num_threads(1)  # tests run two workers on two cores


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"): return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords: item.add_marker(skip)
