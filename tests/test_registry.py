"""Entry-point discovery: states, broken and conflicting plugins, selection, creation.

Fake plugins are real distributions: a ``*.dist-info`` directory with ``entry_points.txt``
and a module on ``sys.path``, so importlib.metadata reads them exactly as it reads an
installed wheel.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from sagellm_backend.errors import (
    BackendNotAvailableError,
    ConfigError,
    PluginConflictError,
    PluginLoadError,
)
from sagellm_backend.registry import (
    BACKENDS_GROUP,
    ENGINES_GROUP,
    BackendRegistry,
    PluginRegistry,
    PluginState,
    discover,
    list_backends,
)

PROVIDER_SRC = """
CALLS = []

class Provider:
    def __init__(self, config=None, **kw):
        self.config = config
        self.kw = kw
    def capability(self): ...
    def create_stream(self): ...
    def create_event(self): ...
    def all_reduce(self, tensor, op): ...
    def all_gather(self, tensor): ...
    def kv_block_alloc(self, num_tokens, dtype): ...
    def kv_block_free(self, block): ...
    def kv_block_copy(self, src, dst): ...
    def kv_block_migrate(self, block, target_device): ...
    def memory_stats(self): return {}
    def clear_cache(self): ...
    def register_kernel(self, name, impl): ...
    def get_kernel(self, name): ...

def factory(config=None, **kw):
    CALLS.append((config, kw))
    return Provider(config, **kw)
"""


class FakeSite:
    """A directory on sys.path holding fake distributions and their plugin modules."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.prefix = f"fakeplug_{uuid.uuid4().hex[:8]}"
        monkeypatch.syspath_prepend(str(root))
        self._modules: list[str] = []

    def module(self, suffix: str, source: str) -> str:
        name = f"{self.prefix}_{suffix}"
        (self.root / f"{name}.py").write_text(textwrap.dedent(source))
        self._modules.append(name)
        return name

    def provider_module(self, suffix: str, extra: str = "") -> str:
        return self.module(suffix, PROVIDER_SRC + textwrap.dedent(extra))

    def dist(self, name: str, version: str, entries: dict[str, dict[str, str]]) -> None:
        info = self.root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = []
        for group, eps in entries.items():
            lines.append(f"[{group}]")
            lines += [f"{k} = {v}" for k, v in eps.items()]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")

    def entry_points(self) -> list[importlib.metadata.EntryPoint]:
        return [
            ep
            for dist in importlib.metadata.distributions(path=[str(self.root)])
            for ep in dist.entry_points
        ]

    def cleanup(self) -> None:
        for name in self._modules:
            sys.modules.pop(name, None)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = FakeSite(tmp_path, monkeypatch)
    yield fake
    fake.cleanup()


def backends(**eps: str) -> dict[str, dict[str, str]]:
    return {BACKENDS_GROUP: eps}


# --------------------------------------------------------------------------- discovery


def test_installed_groups_declare_the_builtin_kinds() -> None:
    records = discover(BACKENDS_GROUP)
    assert {"mock", "cpu", "cuda"} <= set(records)
    mock = records["mock"]
    assert mock.value == "sagellm_backend.providers.mock:create_mock_backend"
    assert mock.dist_name is not None
    assert importlib.metadata.version(mock.dist_name) == mock.dist_version
    assert not mock.conflict
    assert {"mock", "cpu", "cuda", "hf_cuda"} <= set(PluginRegistry(ENGINES_GROUP).kinds())


def test_discover_imports_nothing(site: FakeSite) -> None:
    mod = site.module("never", "raise RuntimeError('imported at discovery')\n")
    site.dist("vendor-x", "1.0", backends(xpu=f"{mod}:factory"))
    records = discover(BACKENDS_GROUP, entry_points=site.entry_points())
    assert list(records) == ["xpu"]
    assert records["xpu"].package == "vendor-x==1.0"
    assert mod not in sys.modules


def test_groups_are_kept_apart(site: FakeSite) -> None:
    mod = site.provider_module("p")
    site.dist(
        "vendor-x",
        "1.0",
        {
            BACKENDS_GROUP: {"xpu": f"{mod}:factory"},
            ENGINES_GROUP: {"xpu_engine": f"{mod}:factory"},
        },
    )
    eps = site.entry_points()
    assert list(discover(BACKENDS_GROUP, entry_points=eps)) == ["xpu"]
    assert list(discover(ENGINES_GROUP, entry_points=eps)) == ["xpu_engine"]


# --------------------------------------------------------------------------- broken plugins


def test_plugin_raising_on_import_is_reported_by_name_and_hides_nothing(site: FakeSite) -> None:
    good = site.provider_module("good")
    bad = site.module("bad", "raise RuntimeError('driver library libxpu.so not found')\n")
    site.dist("vendor-good", "2.0", backends(good=f"{good}:factory"))
    site.dist("vendor-bad", "0.3", backends(bad=f"{bad}:factory"))
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})

    statuses = {s.name: s for s in registry.statuses()}
    assert set(statuses) == {"good", "bad"}
    assert statuses["good"].available
    broken = statuses["bad"]
    assert broken.state is PluginState.ERROR
    assert not broken.loaded
    assert "'bad'" in broken.reason and "libxpu.so" in broken.reason
    assert "vendor-bad==0.3" in broken.reason
    assert isinstance(broken.error, PluginLoadError)
    assert broken.error.group == BACKENDS_GROUP and broken.error.name == "bad"
    assert isinstance(broken.error.__cause__, RuntimeError)

    with pytest.raises(PluginLoadError) as info:
        registry.load("bad")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(PluginLoadError):
        registry.create("bad")
    # auto-selection still works and the broken one is named in the reason
    selection = registry.select()
    assert selection.kind == "good"
    assert "bad: error" in selection.reason


def test_missing_module_and_missing_attribute(site: FakeSite) -> None:
    mod = site.provider_module("p")
    site.dist(
        "vendor",
        "1.0",
        backends(nomod=f"{site.prefix}_does_not_exist:factory", noattr=f"{mod}:nope"),
    )
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})
    nomod = registry.status("nomod")
    assert nomod.state is PluginState.ERROR
    assert isinstance(nomod.error, PluginLoadError)
    assert isinstance(nomod.error.__cause__, ModuleNotFoundError)
    noattr = registry.status("noattr")
    assert isinstance(noattr.error, PluginLoadError)
    assert isinstance(noattr.error.__cause__, AttributeError)


def test_availability_hook_that_raises_is_an_error_not_unavailable(site: FakeSite) -> None:
    mod = site.provider_module(
        "hook",
        """
        def _boom():
            raise OSError("device query failed")
        factory.is_available = _boom

        def other(config=None, **kw):
            return Provider(config, **kw)
        other.is_available = lambda: "yes"
        """,
    )
    site.dist("vendor", "1.0", backends(raising=f"{mod}:factory", notbool=f"{mod}:other"))
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})
    raising = registry.status("raising")
    assert raising.state is PluginState.ERROR and raising.loaded
    assert "device query failed" in raising.reason
    assert isinstance(raising.error, PluginLoadError)
    assert isinstance(raising.error.__cause__, OSError)
    notbool = registry.status("notbool")
    assert notbool.state is PluginState.ERROR
    assert "must return a bool" in notbool.reason


# --------------------------------------------------------------------------- conflicts


def test_two_distributions_claiming_one_kind_is_a_conflict(site: FakeSite) -> None:
    a = site.provider_module("a")
    b = site.provider_module("b")
    ok = site.provider_module("ok")
    site.dist("vendor-a", "1.0", backends(npu=f"{a}:factory", solo=f"{ok}:factory"))
    site.dist("vendor-b", "2.0", backends(npu=f"{b}:factory"))
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})

    record = registry.record("npu")
    assert record.conflict
    assert {s.dist_name for s in record.sources} == {"vendor-a", "vendor-b"}
    status = registry.status("npu")
    assert status.state is PluginState.ERROR
    assert isinstance(status.error, PluginConflictError)
    assert "vendor-a==1.0" in status.reason and "vendor-b==2.0" in status.reason
    with pytest.raises(PluginConflictError, match="pip uninstall"):
        registry.create("npu")
    with pytest.raises(PluginConflictError):
        BackendRegistry(entry_points=site.entry_points(), environ={}).select("npu")
    # neither conflicting module was imported to "pick one"
    assert a not in sys.modules and b not in sys.modules
    assert registry.status("solo").available
    assert registry.select().kind == "solo"


def test_conflict_with_an_installed_builtin_kind(
    site: FakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A third-party wheel that also registers ``mock`` conflicts with ours, globally."""
    mod = site.provider_module("m")
    site.dist("evil-mock", "9.9", backends(mock=f"{mod}:factory"))
    importlib.invalidate_caches()
    statuses = {s.name: s for s in list_backends()}
    assert statuses["mock"].state is PluginState.ERROR
    assert isinstance(statuses["mock"].error, PluginConflictError)
    assert "evil-mock==9.9" in statuses["mock"].reason


def test_same_distribution_seen_twice_is_not_a_conflict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An editable install shadowing a site-packages copy of the same distribution."""
    (tmp_path / "editable").mkdir()
    (tmp_path / "site").mkdir()
    first = FakeSite(tmp_path / "editable", monkeypatch)
    second = FakeSite(tmp_path / "site", monkeypatch)
    mod = first.provider_module("p")
    first.dist("vendor_pkg", "1.1.dev0", backends(xpu=f"{mod}:factory"))
    second.dist("Vendor-Pkg", "1.0", backends(xpu=f"{mod}:other"))
    records = discover(BACKENDS_GROUP, entry_points=first.entry_points() + second.entry_points())
    assert not records["xpu"].conflict
    assert records["xpu"].dist_version == "1.1.dev0"  # the first on sys.path wins
    assert records["xpu"].value == f"{mod}:factory"
    first.cleanup()


def test_entry_points_without_distribution(site: FakeSite) -> None:
    mod = site.provider_module("p")
    ep = importlib.metadata.EntryPoint("xpu", f"{mod}:factory", BACKENDS_GROUP)
    records = discover(BACKENDS_GROUP, entry_points=[ep, ep])
    assert not records["xpu"].conflict and records["xpu"].dist_name is None
    other = importlib.metadata.EntryPoint("xpu", f"{mod}:Provider", BACKENDS_GROUP)
    assert discover(BACKENDS_GROUP, entry_points=[ep, other])["xpu"].conflict


# --------------------------------------------------------------------------- selection


def _hardware_site(site: FakeSite) -> BackendRegistry:
    mod = site.provider_module(
        "hw",
        """
        def gpu(config=None, **kw):
            return Provider(config, **kw)
        gpu.is_available = lambda: False
        gpu.unavailable_reason = lambda: "no GPU visible (driver not loaded)"

        def host(config=None, **kw):
            return Provider(config, **kw)
        host.is_available = lambda: True

        def fast(config=None, **kw):
            return Provider(config, **kw)
        fast.is_available = lambda: True
        fast.priority = lambda: 50

        def fake(config=None, **kw):
            return Provider(config, **kw)
        """,
    )
    site.dist(
        "vendor",
        "1.0",
        backends(cuda=f"{mod}:gpu", cpu=f"{mod}:host", mock=f"{mod}:fake", npu=f"{mod}:fast"),
    )
    return BackendRegistry(entry_points=site.entry_points(), environ={})


def test_auto_selection_prefers_priority_and_explains(
    site: FakeSite, caplog: pytest.LogCaptureFixture
) -> None:
    registry = _hardware_site(site)
    statuses = {s.name: s for s in registry.statuses()}
    assert statuses["cuda"].state is PluginState.UNAVAILABLE
    assert statuses["cuda"].reason == "no GPU visible (driver not loaded)"
    assert statuses["cuda"].priority == 100 and statuses["cpu"].priority == 10
    assert statuses["mock"].priority == -1 and statuses["npu"].priority == 50
    assert statuses["mock"].reason.startswith("loaded; declares no is_available()")
    with caplog.at_level(logging.INFO, logger="sagellm_backend.registry"):
        selection = registry.select()
    assert selection.kind == "npu" and selection.source == "auto"
    assert "cuda: unavailable" in selection.reason and "no GPU visible" in selection.reason
    assert {c.name for c in selection.candidates} == {"cuda", "cpu", "mock", "npu"}
    assert any("'npu' selected" in r.getMessage() for r in caplog.records)
    json.dumps(selection.to_dict())


def test_auto_selection_never_picks_the_mock(site: FakeSite) -> None:
    mod = site.provider_module("m")
    site.dist("vendor", "1.0", backends(mock=f"{mod}:factory"))
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})
    assert registry.status("mock").available
    with pytest.raises(BackendNotAvailableError, match="SAGELLM_BACKEND=mock") as info:
        registry.select()
    assert "mock: available (priority -1" in str(info.value)
    assert registry.select("mock").kind == "mock"


def test_ties_are_reported(site: FakeSite) -> None:
    mod = site.provider_module("t")
    site.dist("vendor", "1.0", backends(beta=f"{mod}:factory", alpha=f"{mod}:factory"))
    selection = BackendRegistry(entry_points=site.entry_points(), environ={}).select()
    assert selection.kind == "alpha"
    assert "tied with beta" in selection.reason


def test_env_override_is_validated_before_any_plugin_is_imported(site: FakeSite) -> None:
    mod = site.provider_module("e")
    site.dist("vendor", "1.0", backends(cpu=f"{mod}:factory", mock=f"{mod}:factory"))
    registry = BackendRegistry(
        entry_points=site.entry_points(), environ={"SAGELLM_BACKEND": "cdua"}
    )
    with pytest.raises(ConfigError) as info:
        registry.select()
    message = str(info.value)
    assert "SAGELLM_BACKEND='cdua'" in message and "cpu, mock" in message
    assert isinstance(info.value, ValueError)
    assert mod not in sys.modules
    with pytest.raises(ConfigError):
        registry.create()


def test_env_override_selects_named_kind_even_the_mock(site: FakeSite) -> None:
    registry = _hardware_site(site)
    env = BackendRegistry(entry_points=site.entry_points(), environ={"SAGELLM_BACKEND": "mock"})
    selection = env.select()
    assert (selection.kind, selection.source) == ("mock", "env")
    assert "SAGELLM_BACKEND=mock" in selection.reason
    unavailable = BackendRegistry(
        entry_points=site.entry_points(), environ={"SAGELLM_BACKEND": "cuda"}
    )
    with pytest.raises(BackendNotAvailableError, match="no GPU visible"):
        unavailable.select()
    # an explicit kind beats the environment; "auto" in the environment means auto
    assert unavailable.select("cpu").kind == "cpu"
    auto = BackendRegistry(entry_points=site.entry_points(), environ={"SAGELLM_BACKEND": "auto"})
    assert auto.select().kind == registry.select().kind == "npu"


def test_env_override_naming_a_broken_plugin_raises_its_load_error(site: FakeSite) -> None:
    bad = site.module("bad", "import no_such_dependency_xyz\n")
    site.dist("vendor", "1.0", backends(xpu=f"{bad}:factory"))
    registry = BackendRegistry(entry_points=site.entry_points(), environ={"SAGELLM_BACKEND": "xpu"})
    with pytest.raises(PluginLoadError) as info:
        registry.select()
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_unknown_kind_lists_valid_kinds(site: FakeSite) -> None:
    registry = _hardware_site(site)
    with pytest.raises(ConfigError, match=r"valid kinds: cpu, cuda, mock, npu"):
        registry.create("tpu")
    with pytest.raises(ConfigError):
        registry.status("tpu")


# --------------------------------------------------------------------------- creation


def test_create_passes_config_and_kwargs(site: FakeSite) -> None:
    mod_name = site.provider_module("c")
    site.dist("vendor", "1.0", backends(xpu=f"{mod_name}:factory"))
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})
    provider = registry.create("xpu", {"kind": "xpu", "device": "xpu:1"}, pool_mb=64)
    module = sys.modules[mod_name]
    assert module.CALLS[-1] == ({"kind": "xpu", "device": "xpu:1"}, {"pool_mb": 64})
    assert provider.kw == {"pool_mb": 64}
    registry.create("xpu")
    assert module.CALLS[-1] == (None, {})

    class CoreStyleConfig:  # what sagellm-core passes: an object with .kind
        kind = "xpu"
        device = None

    cfg = CoreStyleConfig()
    assert registry.create(config=cfg).config is cfg
    with pytest.raises(ConfigError, match="non-empty string"):
        registry.create(config={"kind": ""})


def test_create_wraps_unexpected_factory_failures_and_checks_the_result(site: FakeSite) -> None:
    mod = site.provider_module(
        "f",
        """
        def crashes(config=None, **kw):
            raise AttributeError("'NoneType' object has no attribute 'handle'")

        def bad_config(config=None, **kw):
            raise ValueError("pool_mb must be > 0, got -1")

        def not_a_provider(config=None, **kw):
            return object()

        NOT_CALLABLE = 42
        """,
    )
    site.dist(
        "vendor",
        "1.0",
        backends(
            crash=f"{mod}:crashes",
            cfg=f"{mod}:bad_config",
            obj=f"{mod}:not_a_provider",
            const=f"{mod}:NOT_CALLABLE",
        ),
    )
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})
    with pytest.raises(PluginLoadError, match="factory raised AttributeError") as info:
        registry.create("crash")
    assert isinstance(info.value.__cause__, AttributeError)
    with pytest.raises(ValueError, match="pool_mb must be > 0"):
        registry.create("cfg")
    with pytest.raises(PluginLoadError, match=r"not a BackendProvider \(missing: capability"):
        registry.create("obj")
    with pytest.raises(PluginLoadError, match="not callable"):
        registry.create("const")


def test_create_asks_the_availability_hook_whatever_names_the_kind(site: FakeSite) -> None:
    mod = site.provider_module(
        "avail",
        """
        def down(config=None, **kw):
            CALLS.append(("down", config))
            return Provider(config, **kw)
        down.is_available = lambda: False
        down.unavailable_reason = lambda: "xpu driver 9 needed, found 7"

        def _boom():
            raise OSError("driver query crashed")

        def crashing_hook(config=None, **kw):
            CALLS.append(("crash", config))
            return Provider(config, **kw)
        crashing_hook.is_available = _boom
        """,
    )
    site.dist("vendor", "1.0", backends(xdown=f"{mod}:down", xhook=f"{mod}:crashing_hook"))
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})
    for create in (
        lambda: registry.create("xdown"),
        lambda: registry.create(config={"kind": "xdown"}),
        lambda: BackendRegistry(
            entry_points=site.entry_points(), environ={"SAGELLM_BACKEND": "xdown"}
        ).create(),
    ):
        with pytest.raises(BackendNotAvailableError, match="xpu driver 9 needed, found 7") as info:
            create()
        assert "'xdown'" in str(info.value)
    for create in (lambda: registry.create("xhook"), lambda: registry.select("xhook")):
        with pytest.raises(PluginLoadError, match=r"'xhook'.*driver query crashed") as err:
            create()
        assert (err.value.group, err.value.name) == (BACKENDS_GROUP, "xhook")
        assert isinstance(err.value.__cause__, OSError)
    assert sys.modules[mod].CALLS == []  # no factory ran


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        ("ValueError('pool_mb must be > 0')", ValueError),
        ("TypeError(\"factory() got an unexpected keyword argument 'bogus'\")", TypeError),
        ("ImportError('libxpu.so not found')", ImportError),
        ("ConfigError('device xpu:9 does not exist')", ConfigError),
        ("DependencyMissingError('pip install xpu-runtime')", ImportError),
        ("BackendNotAvailableError('device lost')", BackendNotAvailableError),
    ],
)
def test_factory_errors_keep_their_type_and_name_the_plugin(
    site: FakeSite, raised: str, expected: type[Exception]
) -> None:
    mod = site.provider_module(
        "raise",
        f"""
        from sagellm_backend.errors import (
            BackendNotAvailableError, ConfigError, DependencyMissingError,
        )

        def raising(config=None, **kw):
            raise {raised}
        """,
    )
    site.dist("vendor-x", "3.1", backends(xpu=f"{mod}:raising"))
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})
    for _ in range(2):  # each failure carries exactly one note
        with pytest.raises(expected) as info:
            registry.create("xpu")
        assert type(info.value).__name__ == raised.split("(")[0]
        note = f"while creating backend 'xpu' from entry point {BACKENDS_GROUP}: xpu = {mod}:"
        notes = getattr(info.value, "__notes__", [])
        assert len(notes) == 1 and notes[0].startswith(note), notes
        assert f"{mod}:raising (vendor-x==3.1)" in notes[0]


def test_cli_one_line_error_shows_the_notes(site: FakeSite) -> None:
    from sagellm_backend.cli._common import describe_exception

    mod = site.provider_module(
        "cli", "def bad(config=None, **kw):\n    raise ValueError('pool_mb\\nmust be > 0')\n"
    )
    site.dist("vendor", "1.0", backends(xpu=f"{mod}:bad"))
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})
    with pytest.raises(ValueError) as info:
        registry.create("xpu")
    line = describe_exception(info.value)
    assert "\n" not in line
    assert line.startswith("ValueError: pool_mb must be > 0 (while creating backend 'xpu'")
    assert describe_exception(ValueError("plain")) == "ValueError: plain"


def test_a_failed_import_is_attempted_once_per_registry(site: FakeSite) -> None:
    log = site.root / "imports.log"
    bad = site.module(
        "once",
        f"""
        with open({str(log)!r}, "a") as f:
            f.write("imported\\n")
        raise ImportError("libfoo missing")
        """,
    )
    site.dist("vendor", "1.0", backends(xpu=f"{bad}:factory"))
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})
    assert registry.status("xpu").state is PluginState.ERROR
    with pytest.raises(PluginLoadError):
        registry.create("xpu")
    with pytest.raises(BackendNotAvailableError):
        registry.select()
    assert log.read_text().count("imported") == 1
    registry.refresh()
    registry.statuses()
    assert log.read_text().count("imported") == 2


def test_monkeypatched_importlib_entry_points_are_honoured(
    site: FakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    mod = site.provider_module("g")
    site.dist("vendor", "1.0", backends(only=f"{mod}:factory"))
    eps = site.entry_points()
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda group=None: [ep for ep in eps if group is None or ep.group == group],
    )
    statuses = list_backends()
    assert [s.name for s in statuses] == ["only"]
    payload = json.dumps([s.to_dict() for s in statuses])
    assert '"package": "vendor==1.0"' in payload


def test_hooks_are_found_on_the_defining_module(site: FakeSite) -> None:
    mod = site.provider_module(
        "modhooks",
        """
        def is_available():
            return False

        def unavailable_reason():
            return "xpu driver 1.2 needed, found none"

        def priority():
            return 70
        """,
    )
    quiet = site.provider_module(
        "quiet",
        """
        def is_available():
            return False

        def unavailable_reason():
            return None
        """,
    )
    site.dist("vendor", "1.0", backends(xpu=f"{mod}:factory", npu=f"{quiet}:factory"))
    registry = BackendRegistry(entry_points=site.entry_points(), environ={})
    xpu = registry.status("xpu")
    assert xpu.state is PluginState.UNAVAILABLE
    assert xpu.reason == "xpu driver 1.2 needed, found none"
    assert xpu.priority == 70
    assert registry.status("npu").reason == "is_available() returned False"
