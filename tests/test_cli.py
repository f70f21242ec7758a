"""The command line end to end on small pools, bad input included (exit 2, one line, nothing written)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from cm_engine.cli import main

N, C = 600, 5


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(N, C)) * 3).astype(np.float16)
    z = logits.astype(np.float64)
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = rng.integers(0, 40, size=N).astype(np.int64)
    emb = rng.normal(size=(N, 8)).astype(np.float32)
    paths = {}
    for name, arr in {"logits": logits, "probs": probs.astype(np.float32), "labels": labels, "emb": emb,
                      "scores": rng.random(N).astype(np.float32), "exclude": np.arange(0, N, 7)}.items():
        paths[name] = tmp_path / f"{name}.npy"
        np.save(paths[name], arr)
    paths["dir"] = tmp_path
    return paths


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _listing(d):
    return sorted(p.name for p in d.iterdir())


def test_select_from_logits_json(files, capsys):
    out = files["dir"] / "picked.npy"
    code, stdout, _ = run(capsys, "select", "--logits", files["logits"], "--labels", files["labels"],
                          "--budget", 50, "--km-ratio", 2, "--exclude", files["exclude"], "--json", "--quiet",
                          "--out", out)
    assert code == 0
    summary = json.loads(stdout)
    picked = np.load(out)
    assert summary["n_picked"] == 50 == picked.size and picked.dtype == np.int64
    assert len(np.unique(picked)) == 50
    assert not np.isin(picked, np.load(files["exclude"])).any()
    assert not [p for p in _listing(files["dir"]) if "tmp" in p]


def test_select_same_result_from_scores_logits_probabilities(files, capsys):
    from cm_engine import margin_scores

    s = margin_scores(np.load(files["logits"]))
    np.save(files["dir"] / "s.npy", s)
    picks = []
    for flag, path in [("--scores", files["dir"] / "s.npy"), ("--logits", files["logits"])]:
        out = files["dir"] / f"p{flag}.npy"
        assert run(capsys, "select", flag, path, "--labels", files["labels"], "--budget", 30, "--quiet",
                   "--out", out)[0] == 0
        picks.append(np.load(out))
    np.testing.assert_array_equal(picks[0], picks[1])
    out = files["dir"] / "pp.npy"
    assert run(capsys, "select", "--probabilities", files["probs"], "--labels", files["labels"], "--budget", 30,
               "--quiet", "--out", out)[0] == 0
    assert np.load(out).size == 30


def _bad(tmp, name, arr):
    p = tmp / name
    np.save(p, arr)
    return p


@pytest.mark.parametrize("case", [
    "nan_logits", "neg_budget", "km_ratio", "exclude_range", "exclude_dup", "labels_len", "labels_float",
    "two_sources", "no_source", "truncated", "missing", "out_dir", "probs_sum", "one_class",
])
def test_select_bad_input_exits_2_and_writes_nothing(files, capsys, case):
    d = files["dir"]
    lg = np.load(files["logits"]).astype(np.float32)
    args = {"--logits": files["logits"], "--labels": files["labels"], "--budget": 10}
    extra = []
    expect = None
    if case == "nan_logits":
        lg[17, 2] = np.nan
        args["--logits"], expect = _bad(d, "nan.npy", lg), "logits"
    elif case == "neg_budget":
        args["--budget"], expect = -1, "budget"
    elif case == "km_ratio":
        extra, expect = ["--km-ratio", "0.5"], "km_ratio"
    elif case == "exclude_range":
        extra, expect = ["--exclude", _bad(d, "ex.npy", np.array([1, N]))], "exclude"
    elif case == "exclude_dup":
        extra, expect = ["--exclude", _bad(d, "ex.npy", np.array([3, 3]))], "exclude"
    elif case == "labels_len":
        args["--labels"], expect = _bad(d, "l.npy", np.zeros(N - 1, np.int64)), "labels"
    elif case == "labels_float":
        args["--labels"], expect = _bad(d, "l.npy", np.zeros(N, np.float32)), "labels"
    elif case == "two_sources":
        extra, expect = ["--scores", files["scores"]], "--scores"
    elif case == "no_source":
        del args["--logits"]
        expect = "--scores"
    elif case == "truncated":
        raw = files["logits"].read_bytes()
        p = d / "trunc.npy"
        p.write_bytes(raw[: len(raw) // 2])
        args["--logits"], expect = p, "logits"
    elif case == "missing":
        args["--logits"], expect = d / "nope.npy", "logits"
    elif case == "out_dir":
        out = d / "no" / "such" / "dir" / "p.npy"
        expect = "--out"
    elif case == "probs_sum":
        del args["--logits"]
        args["--probabilities"], expect = _bad(d, "pr.npy", np.full((N, C), 0.5, np.float32)), "prob"
    elif case == "one_class":
        args["--logits"], expect = _bad(d, "one.npy", lg[:, :1]), "logits"
    if case != "out_dir":
        out = d / "picked.npy"
    before = _listing(d)
    argv = ["select", "--quiet", "--out", out] + [x for kv in args.items() for x in kv] + extra
    code, stdout, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("cm-engine: error:") and err.count("\n") == 1, err
    assert expect.lower() in err.lower(), err
    assert _listing(d) == before
    assert not out.exists()


def test_cluster_then_select(files, capsys):
    d = files["dir"]
    labels = d / "labels.npy"
    code, stdout, _ = run(capsys, "cluster", "--embeddings", files["emb"], "--target-mean-size", 10, "--k", 10,
                          "--cache-dir", d / "cache", "--json", "--quiet", "--out", labels)
    assert code == 0, stdout
    s = json.loads(stdout)
    lab = np.load(labels)
    assert lab.shape == (N,) and lab.dtype == np.int64
    assert s["n_clusters"] == lab.max() + 1 == len(np.unique(lab))
    # the second run comes from the cache and gives the same labels
    code, stdout2, _ = run(capsys, "cluster", "--embeddings", files["emb"], "--target-mean-size", 10, "--k", 10,
                           "--cache-dir", d / "cache", "--json", "--quiet", "--out", d / "labels2.npy")
    assert code == 0
    np.testing.assert_array_equal(np.load(d / "labels2.npy"), lab)
    # --relink 0 (merges along graph edges only): the cached graph, a new merge list
    code, stdout3, _ = run(capsys, "cluster", "--embeddings", files["emb"], "--target-mean-size", 10, "--k", 10,
                           "--relink", 0, "--cache-dir", d / "cache", "--json", "--quiet", "--out", d / "labels0.npy")
    assert code == 0 and json.loads(stdout3)["cache_hits"] == {"graph": True, "merges": False}
    assert np.load(d / "labels0.npy").shape == lab.shape
    out = d / "picked.npy"
    assert run(capsys, "select", "--logits", files["logits"], "--labels", labels, "--budget", 40, "--quiet",
               "--out", out)[0] == 0
    assert np.load(out).size == 40


@pytest.mark.parametrize("argv,expect", [
    (["--epsilon", "0.1", "--target-mean-size", "10"], "--epsilon"),
    ([], "--epsilon"),
    (["--epsilon", "-1"], "epsilon"),
    (["--epsilon", "0.1", "--k", "0"], "k"),
    (["--epsilon", "0.1", "--k", str(N)], "k"),
    (["--epsilon", "0.1", "--relink", "-2"], "relink"),
    (["--epsilon", "0.1", "--metric", "l2", "--relink", "4"], "relink"),
])
def test_cluster_bad_input(files, capsys, argv, expect):
    out = files["dir"] / "cluster-out.npy"
    code, _, err = run(capsys, "cluster", "--embeddings", files["emb"], "--quiet", "--out", out, *argv)
    assert code == 2 and expect in err and err.count("\n") == 1, err
    assert not out.exists()


def test_demo_small_pool(tmp_path, capsys):
    code, stdout, _ = run(capsys, "demo", "--n", 3000, "--d", 16, "--classes", 10, "--budget", 200,
                          "--workdir", tmp_path, "--json", "--quiet")
    assert code == 0
    s = json.loads(stdout)
    picked = np.load(s["out"])
    assert s["n_picked"] == 200 == picked.size == len(np.unique(picked))
    assert {"pool (generate/open)", "graph + HAC (cached)", "margin scores",
            "round-robin selection"} <= set(s["stages"])
    assert 3 <= s["clusters"]["mean_size"] <= 30


def test_console_script_entry_point(files):
    r = subprocess.run([sys.executable, "-m", "cm_engine.cli", "select", "--logits", str(files["logits"]),
                        "--labels", str(files["labels"]), "--budget", "-5", "--out", str(files["dir"] / "x.npy")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "budget" in r.stderr


@pytest.fixture
def copy_files(tmp_path):
    """A pool of 80 groups x 4 near-copies, its k-NN graph, labels, logits, and one labeled copy per group < 20."""
    from cm_engine.knn import knn_graph

    rng = np.random.default_rng(3)
    base = rng.normal(size=(80, 8)).astype(np.float32) * 3
    x = np.repeat(base, 4, axis=0) + 1e-3 * rng.normal(size=(320, 8)).astype(np.float32)
    g = knn_graph(x, k=6, metric="l2")
    p = {"group": np.repeat(np.arange(80), 4)}
    for name, arr in {"I": g.indices, "D": g.distances, "labels": np.arange(320) % 9,
                      "logits": rng.normal(size=(320, 4)).astype(np.float32),
                      "exclude": np.arange(0, 80, 4)}.items():
        p[name] = tmp_path / f"{name}.npy"
        np.save(p[name], arr)
    p["dir"] = tmp_path
    return p


def test_select_dedup_and_report(copy_files, capsys):
    f, grp = copy_files, copy_files["group"]
    base = ["select", "--logits", f["logits"], "--labels", f["labels"], "--budget", 30, "--exclude", f["exclude"],
            "--km-ratio", 2, "--quiet", "--json", "--graph", f["I"], f["D"], "--report"]
    code, out, _ = run(capsys, *base, "--out", f["dir"] / "plain.npy")
    assert code == 0
    plain = json.loads(out)
    assert plain["dedup"] is False and plain["redundancy"]["redundant"] > 0  # margin picks copies
    code, out, _ = run(capsys, *base, "--dedup", "--out", f["dir"] / "dd.npy")
    assert code == 0
    s = json.loads(out)
    picked = np.load(f["dir"] / "dd.npy")
    assert s["dedup"] is True and s["delta"] == plain["delta"] > 0 and picked.size == 30
    assert s["redundancy"]["redundant"] == 0.0 and np.unique(grp[picked]).size == 30
    assert not set(grp[picked].tolist()) & set(grp[np.load(f["exclude"])].tolist())
    # the same picks as the library call; a given delta is used as is
    from cm_engine.margin import margin_scores
    from cm_engine.strategies import cluster_margin

    want = cluster_margin(margin_scores(np.load(f["logits"]), device="cpu"), np.load(f["labels"]), 30, km_ratio=2,
                          exclude=np.load(f["exclude"]), dedup_graph=(np.load(f["I"]), np.load(f["D"])),
                          delta=s["delta"])
    np.testing.assert_array_equal(picked, want)
    code, out, _ = run(capsys, *base, "--dedup", "--delta", "0.5", "--out", f["dir"] / "d2.npy")
    assert code == 0 and json.loads(out)["delta"] == 0.5
    code, out, _ = run(capsys, *[a for a in base if a != "--json"], "--out", f["dir"] / "p2.npy")
    assert code == 0 and "near-copies:" in out


@pytest.mark.parametrize("extra,expect", [
    (["--dedup", "--graph", "I", "D", "--delta", "-0.1"], "--delta"),
    (["--dedup", "--graph", "I", "D", "--delta", "nan"], "--delta"),
    (["--report", "--graph", "I", "D", "--delta", "abc"], "--delta"),
    (["--graph", "I", "D", "--delta", "0.1"], "--delta"),
    (["--dedup"], "--graph"),
    (["--report"], "--graph"),
    (["--dedup", "--graph", "I", "Dnarrow"], "graph"),
    (["--dedup", "--graph", "Ishort", "Dshort"], "graph"),
])
def test_select_dedup_bad_input_exits_2_and_writes_nothing(copy_files, capsys, extra, expect):
    f = copy_files
    d = f["dir"]
    np.save(d / "Dnarrow.npy", np.load(f["D"])[:, :3])
    np.save(d / "Ishort.npy", np.load(f["I"])[:100])
    np.save(d / "Dshort.npy", np.load(f["D"])[:100])
    extra = [str(d / f"{a}.npy") if a in ("I", "D", "Dnarrow", "Dshort", "Ishort") else a for a in extra]
    before = _listing(d)
    out = d / "picked.npy"
    code, stdout, err = run(capsys, "select", "--logits", f["logits"], "--labels", f["labels"], "--budget", 10,
                            "--quiet", "--out", out, *extra)
    assert code == 2
    assert err.startswith("cm-engine: error:") and err.count("\n") == 1, err
    assert expect.lower() in err.lower(), err
    assert _listing(d) == before and not out.exists()


@pytest.mark.parametrize("env, want", [(None, "1"), ("0", "0")])
def test_import_turns_on_huge_pages_for_torch_unless_the_environment_says_otherwise(env, want):
    import os

    e = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env is not None:
        e["THP_MEM_ALLOC_ENABLE"] = env
    r = subprocess.run([sys.executable, "-c", "import cm_engine, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"],
                       env=e, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want
