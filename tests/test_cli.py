"""The console script: the demo on real data, and the store commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from embedder.cli import app
from embedder.demo import run_demo
from retrieval import EdgeStore, StoreSettings

runner = CliRunner()


def test_demo_end_to_end_on_real_emoji(tmp_path, monkeypatch, emoji_items, emoji_features, image_encoder, text_encoder):
    from embedder.config import EmbedderSettings
    from embedder.features import FeatureCache
    from embedder.model import Embedder
    from labeling.config import LabelingConfig, XGBoostParams

    monkeypatch.setenv("EMBEDSTORE_PROJECTION", str(tmp_path / "projection"))
    cache = FeatureCache(tmp_path / "features")  # seeded with this session's features: no second encoding
    signatures = Embedder(image_encoder, text_encoder).encoder_signatures()
    cache.save("emoji", signatures, [it.id for it in emoji_items], emoji_features)
    quick = LabelingConfig(
        truth_field="hidden_label", max_iterations=3, cv_folds=2, xgboost=XGBoostParams(max_rounds=60, eta=0.1)
    )
    run = dict(
        epochs=30,
        feature_cache=cache,
        embedder_settings=EmbedderSettings(),
        labeling_config=quick,
        runs_dir=tmp_path / "runs",
    )
    report = run_demo(StoreSettings(path=tmp_path / "store"), **run)
    assert report.trained_projection and (tmp_path / "projection" / "projection.json").is_file()
    assert report.n_items == 1906 and 190 <= report.n_seed <= 200
    assert report.recall_at_10 >= 0.99
    assert any("flag" in hit.lower() for hit in report.examples["flag of japan"])
    final = report.labeling["final"]
    assert final["counts"]["accepted"] > 100 and final["pseudo_precision"] > 0.85
    assert report.labeling["seed"]["ground_truth"] == report.n_seed
    assert (report.run_dir / "report.json").is_file() and (report.run_dir / "reliability.png").is_file()
    view = report.inspection
    assert view is not None and view.point.state.pseudo_status == "accepted" and len(view.neighbours) == 8
    again = run_demo(
        StoreSettings(path=tmp_path / "store"),
        **{**run, "labeling_config": quick.model_copy(update={"max_iterations": 1})},
    )
    assert not again.trained_projection and again.projection_version == report.projection_version


def test_store_info_and_facet_commands(tmp_path):
    path = tmp_path / "store"
    with EdgeStore(path) as store:
        store.create_collection("items")
        x = np.random.default_rng(1).normal(size=(6, 512))
        payloads = [{"label": "cat", "source": "web"}] * 4 + [{"label": "dog", "source": "shop"}] * 2
        store.upsert("items", list("abcdef"), x, payloads)
    result = runner.invoke(app, ["store", "info", "--path", str(path)])
    assert result.exit_code == 0, result.output
    assert '"points": 6' in result.output
    result = runner.invoke(app, ["store", "facet", "label", "--path", str(path), "-c", "items"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"cat": 4, "dog": 2}
    result = runner.invoke(app, ["store", "facet", "label", "--path", str(path), "-c", "items", "--filter", "{bad"])
    assert result.exit_code == 2 and "not JSON" in result.output
    facet_source = ["store", "facet", "source", "--path", str(path), "-c", "items"]
    result = runner.invoke(app, facet_source)
    assert result.exit_code == 2 and "embedstore store index source" in " ".join(result.output.split())
    result = runner.invoke(app, ["store", "index", "source", "--path", str(path), "-c", "items"])
    assert result.exit_code == 0 and "'source'" in result.output, result.output
    result = runner.invoke(app, facet_source)
    assert result.exit_code == 0 and json.loads(result.output) == {"web": 4, "shop": 2}
    result = runner.invoke(app, ["store", "index", "n", "--kind", "text", "--path", str(path), "-c", "items"])
    assert result.exit_code == 2 and "must be one of" in " ".join(result.output.split())


def test_store_commands_report_errors_cleanly(tmp_path):
    typo = tmp_path / "typo"
    result = runner.invoke(app, ["store", "info", "--path", str(typo)])
    assert result.exit_code == 2 and "no embedded store at" in result.output
    assert not typo.exists()  # a typo'd path is not created as a new, empty store
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["store", "info", "--path", str(tmp_path / "file")])
    assert result.exit_code == 2 and "is a file, not an embedded store directory" in " ".join(result.output.split())
    EdgeStore(tmp_path).close()
    result = runner.invoke(app, ["store", "facet", "label", "--path", str(tmp_path), "-c", "missing"])
    assert result.exit_code == 2
    assert "collection 'missing' does not exist" in result.output
    # the web page on a collection that is not there: said at start, not a 500 on every page
    result = runner.invoke(app, ["ui", "--path", str(tmp_path), "-c", "missing", "--port", "1"])
    assert result.exit_code == 2 and "no collection 'missing' in this store" in " ".join(result.output.split())
    with EdgeStore(tmp_path):
        result = runner.invoke(app, ["store", "info", "--path", str(tmp_path)])
    assert result.exit_code == 2 and "in use by" in result.output


def _emoji_manifest(tmp_path, emoji_items, n_per_class: int = 6):
    """A JSONL manifest of real emoji (image + text + label), ``n_per_class`` of each category."""
    taken: dict[str, int] = {}
    lines = []
    for it in emoji_items:
        if taken.get(it.label, 0) < n_per_class:
            taken[it.label] = taken.get(it.label, 0) + 1
            lines.append(json.dumps({"id": it.id, "image": str(it.image), "text": it.text, "label": it.label}))
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, len(lines)


def test_fit_projection_command_trains_saves_and_will_not_overwrite_by_accident(tmp_path, monkeypatch, emoji_items):
    from embedder.projection import ProjectionArtifact

    out = tmp_path / "projection"
    monkeypatch.setenv("EMBEDSTORE_PROJECTION", str(out))
    manifest, n = _emoji_manifest(tmp_path, emoji_items)
    args = ["fit-projection", "--manifest", str(manifest), "--epochs", "3", "--json"]

    result = runner.invoke(app, [*args, "--labels"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    first = ProjectionArtifact.load(out)
    assert report["version"] == first.version and report["path"] == str(out)
    assert report["modalities"] == ["image", "text"]
    assert report["n_items"] == n and report["n_test"] > 0
    assert report["n_labels_used"] == n - report["n_test"] == first.training["n_labeled"]  # held-out labels unused
    assert set(report["knn"]) == {"128", "256", "512", "raw"} and all(0 <= v <= 1 for v in report["knn"].values())

    result = runner.invoke(app, args)  # a projection is there: refused, and it is left as it was
    assert result.exit_code == 2 and "--force" in " ".join(result.output.split())
    assert ProjectionArtifact.load(out).version == first.version

    result = runner.invoke(app, [*args, "--force"])  # label-free by default
    assert result.exit_code == 0, result.output
    second = ProjectionArtifact.load(out)
    assert second.version != first.version and second.training["n_labeled"] == 0
    assert json.loads(result.output)["knn"]  # the labels still measure it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["items.jsonl", "projection"]  # no half-written leftovers


def test_fit_projection_command_refuses_bad_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDSTORE_PROJECTION", str(tmp_path / "projection"))
    result = runner.invoke(app, ["fit-projection"])
    assert result.exit_code == 2 and "exactly one of --dataset or --manifest" in result.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "t", "pseudo_status": "accepted"}\n')
    result = runner.invoke(app, ["fit-projection", "--manifest", str(bad)])
    assert result.exit_code == 2 and "pseudo_status" in result.output
    assert not (tmp_path / "projection").exists()


def test_a_failed_projection_swap_puts_the_old_one_back(tmp_path, monkeypatch):
    import os

    from embedder import cli

    out = tmp_path / "projection"
    out.mkdir()
    (out / "projection.json").write_text('{"old": true}')

    class Artifact:
        def save(self, directory):
            directory.mkdir()
            (directory / "projection.json").write_text('{"new": true}')

    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith(f".projection.new-{os.getpid()}"):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        cli._write_projection(Artifact(), out)
    assert json.loads((out / "projection.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["projection"]  # nothing half-written left beside it
    monkeypatch.setattr(os, "replace", real_replace)
    cli._write_projection(Artifact(), out)
    assert json.loads((out / "projection.json").read_text()) == {"new": True}


def test_a_projection_left_aside_by_a_killed_fit_is_named_and_dead_leftovers_are_cleared(tmp_path):
    """Killed between its two renames, `fit-projection --force` left no projection; the error said to train a
    new one (every indexed collection would then need a reindex) while the old one sat in a hidden folder."""
    from embedder import cli
    from embedder.errors import ProjectionNotFittedError
    from embedder.projection import ProjectionArtifact

    out = tmp_path / "projection"
    aside = tmp_path / ".projection.old-999999999"
    aside.mkdir()
    (aside / "projection.json").write_text("{}")
    with pytest.raises(ProjectionNotFittedError, match=r"left the previous one at .*\.projection\.old-999999999: move"):
        ProjectionArtifact.load(out)
    dead = tmp_path / ".projection.new-999999999"  # a pid no process has
    dead.mkdir()

    class Artifact:
        def save(self, directory):
            directory.mkdir()
            (directory / "projection.json").write_text('{"new": true}')

    cli._write_projection(Artifact(), out)
    assert not dead.exists() and aside.exists()  # the half-written one goes; the user's old one is theirs


# ------------------------------------------------------------- EMBEDSTORE_* and .env
def _main(argv, capsys):
    from embedder.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    out = capsys.readouterr()
    return done.value.code, out.out + out.err


def test_a_bad_setting_names_its_variable_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDSTORE_SHORTLIST", "-5")
    monkeypatch.setenv("EMBEDSTORE_BACKEND", "foo")
    code, out = _main(["store", "info"], capsys)
    assert code == 2 and "Traceback" not in out
    assert "EMBEDSTORE_BACKEND=foo: Input should be 'edge' or 'server'" in " ".join(out.split())
    assert "EMBEDSTORE_SHORTLIST=-5: Input should be greater than or equal to 1" in " ".join(out.split())
    monkeypatch.delenv("EMBEDSTORE_SHORTLIST")
    monkeypatch.setenv("EMBEDSTORE_BACKEND", "server")
    code, out = _main(["store", "info"], capsys)
    assert code == 2 and "EMBEDSTORE_BACKEND=server needs EMBEDSTORE_URL" in " ".join(out.split())


def test_serve_refuses_a_projection_path_that_does_not_exist(tmp_path, monkeypatch, capsys):
    """A typo in EMBEDSTORE_PROJECTION started a server without embedding whose health check stayed green."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDSTORE_PROJECTION", str(tmp_path / "projcetion"))
    code, out = _main(["serve", "--port", "0", "--metrics-port", "0"], capsys)
    assert code == 2 and "EMBEDSTORE_PROJECTION=" in out and "does not exist" in " ".join(out.split())
    assert not (tmp_path / "data").exists()  # refused before the store was opened


def test_urls_paths_and_the_cache_are_named_by_their_variable(tmp_path, monkeypatch, capsys):
    """A bare host in EMBEDSTORE_URL surfaced as a gRPC resolver traceback, a bad EMBEDSTORE_REDIS_URL as
    redis-py's message naming no variable, an unwritable EMBEDSTORE_CACHE as a FileNotFoundError traceback,
    and a missing EMBEDSTORE_IMAGE_WEIGHTS / EMBEDSTORE_TEXT_MODEL did not say which setting held the path."""
    from embedder.encoders import SentenceTransformerEncoder, cache_dir
    from embedder.errors import ModelUnavailableError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMBEDSTORE_BACKEND", "server")
    for bad, says in [("qdrant", "must be a URL such as http://localhost:6333"), ("http://q:99999", "bad port")]:
        monkeypatch.setenv("EMBEDSTORE_URL", bad)
        code, out = _main(["store", "info"], capsys)
        assert code == 2 and f"EMBEDSTORE_URL={bad}: {says}" in " ".join(out.split()) and "Traceback" not in out
    monkeypatch.setenv("EMBEDSTORE_URL", ":memory:")
    assert StoreSettings().url == ":memory:"  # local mode stays accepted
    monkeypatch.setenv("EMBEDSTORE_REDIS_URL", "localhost:6379:secretpw")
    code, out = _main(["keys", "list", "api"], capsys)
    flat = " ".join(out.split())
    assert code == 2 and "EMBEDSTORE_REDIS_URL=<hidden>: must be a URL such as redis://" in flat
    assert "secretpw" not in out  # a Redis URL may carry a password: never printed back

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("EMBEDSTORE_CACHE", str(blocker / "cache"))  # under a file: cannot be created
    with pytest.raises(ModelUnavailableError, match=r"EMBEDSTORE_CACHE=.*cannot create it"):
        cache_dir()
    monkeypatch.setenv("EMBEDSTORE_CACHE", str(tmp_path / "new" / "cache"))
    assert cache_dir().is_dir()  # created when missing
    with pytest.raises(ModelUnavailableError, match="EMBEDSTORE_TEXT_MODEL"):
        SentenceTransformerEncoder(tmp_path / "no-model")


def test_health_dials_the_interface_the_server_binds(monkeypatch):
    """`health` always dialled 127.0.0.1, so a server bound to one address (EMBEDSTORE_GRPC_HOST) was
    reported down by its own container healthcheck."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.2:0")  # all of 127/8 is loopback on Linux; 127.0.0.1 is not bound
    server.start()
    try:
        monkeypatch.setenv("EMBEDSTORE_GRPC_PORT", str(port))
        monkeypatch.setenv("EMBEDSTORE_GRPC_HOST", "127.0.0.2")
        result = runner.invoke(app, ["health", "--timeout", "5"])
        assert result.exit_code == 0 and f"127.0.0.2:{port}: SERVING" in result.output
        monkeypatch.setenv("EMBEDSTORE_GRPC_HOST", "0.0.0.0")  # a wildcard bind answers on loopback: dialled there
        result = runner.invoke(app, ["health", "--timeout", "1"])
        assert result.exit_code == 1 and f"127.0.0.1:{port}" in result.output
    finally:
        server.stop(None)


def test_dotenv_covers_every_variable_and_typos_are_reported(tmp_path, monkeypatch, capsys):
    """`.env` reaches the variables Typer and the model cache read too (it reached only the settings classes);
    the environment still wins over `.env`; a misspelt name is reported with the nearest real one."""
    import os

    from embedder.environment import known_variables

    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.startswith("EMBEDSTORE_")]:
        monkeypatch.delenv(name)
    for name in ("EMBEDSTORE_SERVER", "EMBEDSTORE_COLECTION"):  # main() copies them in: removed at teardown
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    port = 9  # discard: nothing listens there
    (tmp_path / ".env").write_text(
        f"EMBEDSTORE_SERVER=127.0.0.1:{port}\nEMBEDSTORE_COLECTION=emoji\nEMBEDSTORE_PATH=./from-dotenv\n"
    )
    monkeypatch.setenv("EMBEDSTORE_PATH", str(tmp_path / "from-env"))
    code, out = _main(["search", "red heart"], capsys)
    assert code == 2 and f"127.0.0.1:{port}" in out  # the server named in .env was the one dialled
    assert "EMBEDSTORE_COLECTION is not an embedstore setting (did you mean EMBEDSTORE_COLLECTION?)" in " ".join(
        out.split()
    )
    assert os.environ["EMBEDSTORE_PATH"] == str(tmp_path / "from-env")  # not overwritten by .env
    assert {"EMBEDSTORE_SERVER", "EMBEDSTORE_RUNS_DIR", "EMBEDSTORE_CACHE", "EMBEDSTORE_GRPC_PORT"} <= known_variables()


def test_commands_over_a_server_send_the_collection_the_environment_names(monkeypatch):
    """`label run --server` ignored EMBEDSTORE_COLLECTION and wrote pseudo-labels into the server's default
    collection; `search` and `inspect` read the wrong one the same way."""
    from embedder.environment import remote_collection

    monkeypatch.delenv("EMBEDSTORE_COLLECTION", raising=False)
    assert remote_collection(None) == ""  # nothing set: the server's default
    monkeypatch.setenv("EMBEDSTORE_COLLECTION", "emoji")
    assert remote_collection(None) == "emoji" and remote_collection("other") == "other"


def test_health_names_a_bad_port_variable(monkeypatch):
    """EMBEDSTORE_GRPC_PORT=abc went raw into the target ("127.0.0.1:abc"; Rich even drew an emoji)."""
    monkeypatch.setenv("EMBEDSTORE_GRPC_PORT", "abc")
    result = runner.invoke(app, ["health"])
    assert result.exit_code == 2 and "EMBEDSTORE_GRPC_PORT='abc': not a port number" in result.output


def test_index_can_hold_back_labels_so_a_job_has_points_to_label():
    """`index --dataset emoji` labelled every item, so the README's next step, `label run`, had nothing to do."""
    from embedder.cli import _hold_back_labels
    from embedder.model import Item

    items = [Item(f"i{n}", text=f"t{n}", label=("a", "b", "c")[n % 3]) for n in range(90)] + [Item("u", text="x")]
    out = _hold_back_labels(items, 0.1)
    kept = [it for it in out if it.label]
    assert len(kept) == 9 and {it.label for it in kept} == {"a", "b", "c"}  # ceil(0.1 x 30) = 3 of each class
    held = [it for it in out if not it.label and "truth" in it.payload]
    assert len(held) == 81 and all(it.payload["truth"] == items[int(it.id[1:])].label for it in held)
    assert out[-1].label is None and "truth" not in out[-1].payload  # an unlabelled item stays as it was
    result = runner.invoke(app, ["index", "--dataset", "emoji", "--seed-fraction", "1.5"])
    assert result.exit_code == 2 and "--seed-fraction must be in (0, 1]" in result.output


def test_a_store_held_by_the_web_page_gets_advice_that_fits(capsys):
    """Every lock conflict told the user to add --server, which cannot reach a store the web page holds."""
    import typer

    from embedder.label_cli import _fail
    from retrieval.errors import StoreLockedError

    held = "the embedded store at /d is in use by pid 7 on host h since t (command: 'embedstore ui -c emoji')"
    with pytest.raises(typer.Exit):
        _fail(StoreLockedError(held))
    out = " ".join(capsys.readouterr().out.split())
    assert "stop `embedstore ui`" in out and "--server" not in out
    with pytest.raises(typer.Exit):
        _fail(StoreLockedError(held.replace("embedstore ui -c emoji", "embedstore serve")))
    assert "add --server HOST:PORT" in " ".join(capsys.readouterr().out.split())


def test_every_command_help_is_reflowed_into_paragraphs():
    """Rich help kept the docstrings' source line breaks: `embedstore health --help` read "...: the" / "port from"."""
    from typer.testing import CliRunner

    from embedder.cli import app

    def commands(group):
        yield from group.registered_commands
        for sub in group.registered_groups:
            yield from commands(sub.typer_instance)

    found = list(commands(app))
    assert len(found) >= 20 and all(c.help for c in found)
    assert all("\n" not in para for c in found for para in c.help.split("\n\n")), [c.name for c in found]
    out = CliRunner().invoke(app, ["health", "--help"], env={"COLUMNS": "200"}).output
    assert "it follows the server's own settings: the port from EMBEDSTORE_GRPC_PORT, and TLS" in out
