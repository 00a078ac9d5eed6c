import itertools

import dimod
import numpy as np
import pytest

from icbs_opt.errors import ProblemError
from icbs_opt.problems import BlockProblem, random_problem


def all_points(n):
    return [
        np.array(bits, dtype=np.int8) for bits in itertools.product((0, 1), repeat=n)
    ]


def test_symmetrises_and_keeps_energies():
    Q = np.array([[1.0, 4.0], [0.0, -2.0]])
    p = BlockProblem(Q, 1)
    assert np.allclose(p.Q, [[1.0, 2.0], [2.0, -2.0]])
    for x in all_points(2):
        assert p.energy(x) == pytest.approx(x @ Q @ x)
    assert not p.Q.flags.writeable


@pytest.mark.parametrize(
    ("Q", "k", "match"),
    [
        (np.ones((2, 3)), 1, r"square matrix, got shape \(2, 3\)"),
        (np.ones(3), 1, r"square matrix, got shape \(3,\)"),
        (np.zeros((0, 0)), 0, "n >= 1"),
        (
            np.array([[1.0, np.nan], [0.0, 1.0]]),
            1,
            r"finite, got nan at index \(0, 1\)",
        ),
        (np.array([[np.inf]]), 0, "finite, got inf"),
        (np.eye(3), 4, r"k must be an integer in \[0, 3\], got 4"),
        (np.eye(3), -1, r"k must be an integer in \[0, 3\], got -1"),
        (np.eye(3), 1.5, r"k must be an integer in \[0, 3\], got 1.5"),
        (np.eye(3), float("nan"), "got nan"),
        (np.eye(3), True, "got True"),
        (np.eye(3), "1", "k must be an integer, got '1'"),
        ([["a"]], 0, "numeric matrix"),
        ([[1j]], 0, "Q must be real, got complex"),
        # finite entries whose sum (Q + Q^T) / 2 overflows to inf
        (np.array([[0.0, 1.7e308], [1.7e308, 0.0]]), 1, "too large for float64"),
        # finite after symmetrising, but energies and penalties would overflow
        (np.array([[0.0, 5e306], [5e306, 0.0]]), 1, r"sum \|Q_ij\| = 1e\+307"),
    ],
)
def test_validation_errors(Q, k, match):
    with pytest.raises(ProblemError, match=match):
        BlockProblem(Q, k)


def test_feasibility_and_x_errors():
    p = BlockProblem(np.eye(3), 2)
    assert p.is_feasible([1, 1, 0])
    assert not p.is_feasible([1, 1, 1])
    assert not p.is_feasible([2, 0, 0])
    with pytest.raises(ProblemError, match=r"shape \(3,\), got \(2,\)"):
        p.energy([1, 0])
    with pytest.raises(ProblemError, match="only 0 and 1"):
        p.energy([1, 2, 0])


@pytest.mark.parametrize("k", [0, 2, 5])
def test_bqm_and_ising_match_objective_plus_penalty(k):
    p = random_problem(5, k, seed=k)
    P = 0.7
    bqm = p.to_bqm(P)
    h, J, off = p.to_ising(P)
    assert bqm.vartype is dimod.BINARY and set(bqm.variables) == set(range(5))
    for x in all_points(5):
        expected = p.energy(x) + P * (x.sum() - k) ** 2
        assert bqm.energy(dict(enumerate(x.tolist()))) == pytest.approx(expected)
        s = 2 * x - 1
        assert h @ s + s @ J @ s + off == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_default_penalty_ground_state_is_feasible(seed):
    p = random_problem(7, 3, seed=seed)
    bqm = p.to_bqm()
    energies = {
        tuple(x): bqm.energy(dict(enumerate(x.tolist()))) for x in all_points(7)
    }
    best = min(energies, key=energies.get)
    assert sum(best) == 3
    feasible = [x for x in all_points(7) if x.sum() == 3]
    assert energies[best] == pytest.approx(min(p.energy(x) for x in feasible))


def test_penalty_zero_is_the_objective():
    p = random_problem(4, 2, seed=0)
    bqm = p.to_bqm(0)
    x = np.array([1, 1, 1, 0])
    assert bqm.energy(dict(enumerate(x.tolist()))) == pytest.approx(p.energy(x))
    with pytest.raises(ProblemError, match="penalty must be a finite number >= 0"):
        p.to_bqm(-1)


def test_decode_mapping_spins_and_errors():
    p = BlockProblem(np.eye(3), 1)
    assert p.decode({0: 1, 1: 0, 2: 0}).tolist() == [1, 0, 0]
    assert p.decode([-1, 1, -1]).tolist() == [0, 1, 0]
    assert p.decode(np.array([1, 1, 1])).tolist() == [1, 1, 1]
    with pytest.raises(ProblemError, match="exactly the variables 0..2"):
        p.decode({0: 1, 1: 0})
    with pytest.raises(ProblemError, match=r"0/1 or -1/\+1"):
        p.decode([0, 3, 1])


@pytest.mark.parametrize("start", [[1] * 8, [0] * 8, [1, 0, 1, 1, 1, 0, 1, 0]])
def test_repair_gives_feasible_swap_local_optimum(start):
    p = random_problem(8, 3, seed=4)
    x = p.repair(start)
    assert p.is_feasible(x)
    e = p.energy(x)
    for i in np.flatnonzero(x):
        for j in np.flatnonzero(x == 0):
            y = x.copy()
            y[i], y[j] = 0, 1
            assert p.energy(y) >= e - 1e-12


def test_scaled_problem():
    Q = np.array([[2.0, 1e-14], [1e-14, -4.0]])
    p, scale = BlockProblem(Q, 1).scaled()
    assert scale == pytest.approx(1 / np.mean([2.0, 1e-14, 1e-14, 4.0]))
    assert p.Q[0, 1] == 0.0 and p.Q[0, 0] == pytest.approx(2.0 * scale)


def test_negative_entries_survive_the_cutoff():
    Q = np.array([[-1.0, -0.5], [-0.5, -2.0]])
    p, _ = BlockProblem(Q, 1).scaled()
    assert (p.Q < 0).all()


def test_npz_round_trip_with_meta(tmp_path):
    p = BlockProblem(
        random_problem(6, 2, seed=1).Q, 2, meta={"layer": "fc1", "step": 3}
    )
    p.save(tmp_path / "b.npz")
    q = BlockProblem.load(tmp_path / "b.npz")
    assert np.array_equal(p.Q, q.Q) and q.k == 2
    assert q.meta == {"layer": "fc1", "step": 3}


def test_ubqp_round_trip(tmp_path):
    p = random_problem(6, 2, seed=2)
    p.to_ubqp(tmp_path / "b.ubqp")
    lines = (tmp_path / "b.ubqp").read_text().splitlines()
    assert lines[0] == "# k = 2" and lines[1] == "6 21"
    q = BlockProblem.load(tmp_path / "b.ubqp")
    assert np.allclose(p.Q, q.Q, rtol=1e-15) and q.k == 2
    assert BlockProblem.load(tmp_path / "b.ubqp", k=4).k == 4


def test_bad_files(tmp_path):
    with pytest.raises(ProblemError, match="no such file"):
        BlockProblem.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    with pytest.raises(ProblemError, match=r"bad.npz': not an .npz archive"):
        BlockProblem.load(bad)
    np.savez(tmp_path / "noq.npz", A=np.eye(2))
    with pytest.raises(
        ProblemError, match=r"must hold arrays 'Q' and 'k', found \['A'\]"
    ):
        BlockProblem.load(tmp_path / "noq.npz")
    txt = tmp_path / "junk.txt"
    txt.write_text("hello there world\n")
    with pytest.raises(ProblemError, match="not an .npz or UBQP text file"):
        BlockProblem.load(txt)
    nok = tmp_path / "nok.ubqp"
    nok.write_text("2 1\n1 2 3.0\n")
    with pytest.raises(ProblemError, match="no '# k = K' line"):
        BlockProblem.load(nok)
    assert BlockProblem.load(nok, k=1).Q[0, 1] == pytest.approx(1.5)
    short = tmp_path / "short.ubqp"
    short.write_text("# k = 1\n2 3\n1 2 3.0\n")
    with pytest.raises(ProblemError, match="announces m = 3 entries but 1 lines"):
        BlockProblem.load(short)
    out = tmp_path / "out.ubqp"
    out.write_text("# k = 1\n2 1\n1 5 3.0\n")
    with pytest.raises(
        ProblemError, match=r"line 3: index j must be an integer in \[1, 2\], got '5'"
    ):
        BlockProblem.load(out)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (
            {"Q": np.eye(2), "k": np.array([1])},
            r"single integer, got an array .*\(1,\)",
        ),
        ({"Q": np.eye(2), "k": np.nan}, r"k must be an integer in \[0, 2\], got nan"),
        ({"Q": np.eye(2), "k": 2.5}, r"k must be an integer in \[0, 2\], got 2.5"),
        ({"Q": np.eye(2), "k": 1.0}, r"k must be an integer in \[0, 2\], got 1.0"),
        ({"Q": np.eye(2), "k": True}, "got True"),
        ({"Q": np.eye(2), "k": "1"}, "k must be an integer, got '1'"),
        ({"Q": [[1.0, 2.0]], "k": 1}, r"square matrix, got shape \(1, 2\)"),
    ],
)
def test_bad_npz_contents(tmp_path, arrays, match):
    path = tmp_path / "p.npz"
    np.savez(path, **arrays)
    with pytest.raises(ProblemError, match=f"p.npz': .*{match}"):
        BlockProblem.load(path)


def test_npz_that_is_not_an_array_archive(tmp_path):
    import zipfile

    path = tmp_path / "z.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("Q.npy", "not an array header")
        z.writestr("notes.txt", "hello")
    with pytest.raises(ProblemError, match="z.npz': not a.* .npz archive"):
        BlockProblem.load(path)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "hello")
    with pytest.raises(ProblemError, match="member 'notes.txt' is not a .npy array"):
        BlockProblem.load(path)


def test_directory_and_unreadable_file(tmp_path, monkeypatch):
    with pytest.raises(ProblemError, match="is a directory, not a problem file"):
        BlockProblem.load(tmp_path)
    binary = tmp_path / "binary.ubqp"
    binary.write_bytes(b"\xff\xfe 3 1\n")
    with pytest.raises(ProblemError, match="binary.ubqp': not an .npz or UBQP text"):
        BlockProblem.load(binary)
    path = tmp_path / "locked.ubqp"
    random_problem(3, 1, seed=0).to_ubqp(path)

    def denied(*args, **kwargs):  # as root, chmod cannot make a file unreadable
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("builtins.open", denied)
    with pytest.raises(ProblemError, match="locked.ubqp': cannot read it"):
        BlockProblem.load(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "no header line 'n m'"),
        ("3\n", "line 2 should be the header 'n m'"),
        (
            "-3 1\n1 1 1.0\n",
            r"n in the header 'n m' must be an integer >= 1, got '-3'",
        ),
        ("2 -1\n", r"m in the header 'n m' must be an integer >= 0, got '-1'"),
        ("2.5 1\n1 1 1.0\n", "n in the header 'n m' must be an integer"),
        ("100000000000 1\n1 1 1.0\n", "n = 100000000000 in the header is too large"),
        (
            "2 1\n1.7 2 1.0\n",
            r"line 3: index i must be an integer in \[1, 2\], got '1.7'",
        ),
        ("2 1\n0 2 1.0\n", r"line 3: index i .*got '0'"),
        ("2 1\n1 2\n", "three numbers"),
        ("2 2\n1 2 1.0\n1 2 3 4\n", "three numbers"),
        ("2 1\n1 2 x\n", "three numbers"),
        ("2 1\n1 2 nan\n", "line 3: q must be finite, got 'nan'"),
        ("2 1\n1 2 1e309\n", "line 3: q must be finite, got '1e309'"),
        ("2 1\n1 2 1.0\n3 4 5\n", "announces m = 1 entries but 2 lines follow"),
    ],
)
def test_malformed_ubqp(tmp_path, text, match):
    path = tmp_path / "p.ubqp"
    path.write_text("# k = 1\n" + text)
    with pytest.raises(ProblemError, match=match):
        BlockProblem.load(path)


def test_ubqp_k_line_must_be_an_integer(tmp_path):
    path = tmp_path / "p.ubqp"
    path.write_text("# k = 2.5\n2 1\n1 2 1.0\n")
    with pytest.raises(ProblemError, match=r"k on line 1 .* must be an integer >= 0"):
        BlockProblem.load(path)
    path.write_text("# k = 1\n2 2\n1 2 1.7e308\n2 1 1.7e308\n")
    with pytest.raises(ProblemError, match="too large for float64"):
        BlockProblem.load(path)
