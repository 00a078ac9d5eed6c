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


def test_any_layout_of_q_gives_the_same_problem_and_no_alias():
    Q = np.random.default_rng(0).standard_normal((7, 7))
    expect = (Q + Q.T) / 2.0
    locked = Q.copy()
    locked.flags.writeable = False
    strided = np.kron(Q, np.ones((2, 2)))[::2, ::2]  # Q, not contiguous
    for given in (Q, locked, np.asfortranarray(Q), Q[::-1, ::-1], strided,
                  Q.tolist(), Q.astype(np.float32)):  # fmt: skip
        p = BlockProblem(given, 3)
        G = np.asarray(given, dtype=np.float64)
        assert np.array_equal(p.Q, (G + G.T) / 2.0)
    p = BlockProblem(Q, 3)
    assert np.array_equal(p.Q, expect)
    Q[0, 1] = 100.0  # the problem holds its own matrix
    assert p.Q[0, 1] == expect[0, 1]
    # +inf and -inf across the diagonal cancel to nan: named as Q's entry
    with pytest.raises(ProblemError, match=r"finite, got inf at index \(0, 1\)"):
        BlockProblem(np.array([[0.0, np.inf], [-np.inf, 0.0]]), 1)


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


@pytest.mark.parametrize("zeros", [0, 5])
def test_scaled_is_the_mean_of_nonzero_magnitudes(zeros):
    Q = np.random.default_rng(1).standard_normal((6, 6))
    Q.flat[:zeros] = 0.0  # dense, and with zeros left out of the mean
    p = BlockProblem(Q, 2)
    A = np.abs(p.Q)
    expect = 1.0 / float(A[A > 0].mean())
    s, scale = p.scaled()
    assert scale == expect  # the same bits
    assert np.array_equal(s.Q, p.Q * expect)


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


# ------------------------------------------------------------ grouped problems
def grouped_cases():
    """2:4 on two groups, and unequal sizes and counts on non-contiguous groups."""
    return [
        random_problem(8, 2, seed=1, group_size=4),
        BlockProblem(
            random_problem(9, seed=2).Q, [1, 3, 0], groups=[2, 0, 1, 1, 0, 1, 0, 1, 1]
        ),
    ]


def group_penalty(p, x):
    """sum_g (ones of x in group g - k_g)^2, computed the slow way."""
    return sum(
        (int(x[p.groups == g].sum()) - int(p.group_counts[g])) ** 2
        for g in range(p.num_groups)
    )


def test_grouped_properties_and_repr():
    p = BlockProblem(np.eye(5), [1, 2], groups=[1, 0, 1, 0, 0])
    assert p.k == 3 and p.n == 5 and p.is_grouped and p.num_groups == 2
    assert p.groups.dtype == np.int64 and p.groups.tolist() == [1, 0, 1, 0, 0]
    assert p.group_counts.dtype == np.int64 and p.group_counts.tolist() == [1, 2]
    assert [m.tolist() for m in p.group_indices] == [[1, 3, 4], [0, 2]]
    assert not p.groups.flags.writeable and not p.group_counts.flags.writeable
    assert repr(p) == "BlockProblem(n=5, k=3, groups=2, group_counts=[1, 2])"
    many = random_problem(40, 1, seed=0, group_size=4)
    assert repr(many) == (
        "BlockProblem(n=40, k=10, groups=10, group_counts=[1, 1, 1, 1, 1, ..., 1])"
    )
    every = BlockProblem(np.eye(4), 1, groups=[0, 1, 0, 1])
    assert every.group_counts.tolist() == [1, 1] and every.k == 2


def test_ungrouped_and_single_group_are_the_same():
    plain = BlockProblem(np.eye(3), 2)
    assert plain.groups.tolist() == [0, 0, 0] and plain.group_counts.tolist() == [2]
    assert not plain.is_grouped and plain.num_groups == 1
    for single in (
        BlockProblem(np.eye(3), 2, groups=[0, 0, 0]),
        BlockProblem(np.eye(3), [2], groups=np.zeros(3, dtype=np.int64)),
    ):
        assert not single.is_grouped and repr(single) == repr(plain)
        assert single.k == 2 and single.groups.tolist() == [0, 0, 0]
    # any problem is rebuilt from its counts and groups
    for p in [plain, *grouped_cases()]:
        q = BlockProblem(p.Q, p.group_counts, groups=p.groups)
        assert repr(q) == repr(p) and np.array_equal(q.groups, p.groups)


@pytest.mark.parametrize(
    ("k", "groups", "match"),
    [
        (1, [0, 0, 1], r"shape \(4,\), got shape \(3,\)"),
        (1, [[0, 0], [1, 1]], r"shape \(4,\), got shape \(2, 2\)"),
        (1, [0, 0.5, 1, 1], "integer group ids, got 0.5 at index 1"),
        (1, [0.0, 0.0, 1.0, 1.0], "integer group ids, got 0.0 at index 0"),
        (1, [True, False, True, False], "integer group ids, got True at index 0"),
        (1, ["0", "0", "1", "1"], "integer group ids, got '0' at index 0"),
        (1, [0, None, 1, 1], "integer group ids, got None at index 1"),
        (1, [0, 0, -1, 1], "ids 0..G-1 with G <= n = 4, got -1 at index 2"),
        (1, [0, 0, 7, 1], "ids 0..G-1 with G <= n = 4, got 7 at index 2"),
        (1, [0, 0, 1, 2**70], f"G <= n = 4, got {2**70} at index 3"),
        (1, [0, 0, 2, 2], "every id 0..2, but id 1 has no variable"),
        (1, "0011", "groups must be a sequence of n = 4 ids, got '0011'"),
        (3, [0, 0, 1, 1], r"k for group 0 \(2 variables\) .*\[0, 2\], got 3"),
        ([1, 3], [0, 0, 1, 1], r"k for group 1 \(2 variables\) .*\[0, 2\], got 3"),
        ([1, -1], [0, 0, 1, 1], r"k for group 1 .*got -1"),
        ([1, 1.5], [0, 0, 1, 1], r"k for group 1 .*got 1.5"),
        ([1, 1, 1], [0, 0, 1, 1], r"one count per group \(2 groups\), got \[1, 1, 1\]"),
        ([[1], [1]], [0, 0, 1, 1], "one count per group"),
        ("1", [0, 0, 1, 1], "k must be an integer or one per group, got '1'"),
        ([1, 1], None, r"k must be an integer in \[0, 4\], got \[1, 1\]"),
    ],
)
def test_grouped_validation_errors(k, groups, match):
    with pytest.raises(ProblemError, match=match):
        BlockProblem(np.eye(4), k, groups=groups)


def test_grouped_feasibility_counts_and_warm_start_messages():
    p = random_problem(8, 2, seed=0, group_size=4)
    assert p.is_feasible([1, 1, 0, 0, 0, 1, 0, 1])
    assert not p.is_feasible([1, 1, 1, 0, 0, 1, 0, 0])  # right total, wrong groups
    assert not p.is_feasible([2, 0, 0, 0, 0, 1, 0, 1])
    assert p.count_ones([1, 1, 1, 0, 0, 1, 0, 0]).tolist() == [3, 1]
    batch = np.array([[1, 1, 1, 0, 0, 1, 0, 0], [0] * 8])
    assert p.count_ones(batch).tolist() == [[3, 1], [0, 0]]
    with pytest.raises(ProblemError, match=r"shape \(8,\) or \(m, 8\), got \(3,\)"):
        p.count_ones([1, 0, 1])
    with pytest.raises(
        ProblemError, match="x0 must have exactly 2 ones in group 0, got 3"
    ):
        p.check_feasible([1, 1, 1, 0, 0, 1, 0, 0], "x0")
    with pytest.raises(ProblemError, match="x0 must have exactly k = 4 ones, got 3"):
        random_problem(8, seed=0).check_feasible([1, 1, 1, 0, 0, 0, 0, 0], "x0")
    assert p.check_feasible([-1, 1, 1, -1, -1, 1, -1, 1]).tolist() == [
        0, 1, 1, 0, 0, 1, 0, 1
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(2))
def test_grouped_bqm_and_ising_match_objective_plus_penalty(case):
    p = grouped_cases()[case]
    P = 0.7
    bqm = p.to_bqm(P)
    h, J, off = p.to_ising(P)
    assert bqm.vartype is dimod.BINARY and set(bqm.variables) == set(range(p.n))
    rng = np.random.default_rng(case)
    for x in rng.integers(0, 2, size=(200, p.n)):
        expected = p.energy(x) + P * group_penalty(p, x)
        assert bqm.energy(dict(enumerate(x.tolist()))) == pytest.approx(expected)
        s = 2 * x - 1
        assert h @ s + s @ J @ s + off == pytest.approx(expected)


def test_grouped_bqm_is_the_sum_of_dimod_combinations():
    """The per-group terms equal dimod.generators.combinations, one per group."""
    p = grouped_cases()[1]
    P = 1.3
    expected = dimod.BinaryQuadraticModel(dimod.BINARY)
    for i in range(p.n):
        for j in range(p.n):
            if i == j:
                expected.add_linear(i, p.Q[i, i])
            elif i < j:
                expected.add_quadratic(i, j, 2 * p.Q[i, j])
    for members, count in zip(p.group_indices, p.group_counts, strict=True):
        term = dimod.generators.combinations(members.tolist(), int(count), P)
        expected.update(term)
    got = p.to_bqm(P)
    for x in all_points(p.n)[::7]:
        sample = dict(enumerate(x.tolist()))
        assert got.energy(sample) == pytest.approx(expected.energy(sample))


@pytest.mark.parametrize("case", range(2))
def test_grouped_default_penalty_ground_state_is_feasible(case):
    p = grouped_cases()[case]
    bqm = p.to_bqm()
    points = all_points(p.n)
    energies = [bqm.energy(dict(enumerate(x.tolist()))) for x in points]
    best = points[int(np.argmin(energies))]
    assert p.is_feasible(best)
    feasible = [x for x in points if p.is_feasible(x)]
    assert min(energies) == pytest.approx(min(p.energy(x) for x in feasible))


@pytest.mark.parametrize("case", range(2))
def test_grouped_repair_is_feasible_and_swap_optimal_within_groups(case):
    p = grouped_cases()[case]
    rng = np.random.default_rng(case)
    starts = [np.ones(p.n, int), np.zeros(p.n, int), *rng.integers(0, 2, (8, p.n))]
    for start in starts:
        x = p.repair(start)
        assert x.dtype == np.int8 and p.is_feasible(x)
        e = p.energy(x)
        for i in np.flatnonzero(x):
            for j in np.flatnonzero((x == 0) & (p.groups == p.groups[i])):
                y = x.copy()
                y[i], y[j] = 0, 1
                assert p.energy(y) >= e - 1e-12


def test_grouped_repair_leaves_a_feasible_optimum_alone():
    p = grouped_cases()[0]
    feasible = [x for x in all_points(p.n) if p.is_feasible(x)]
    best = min(feasible, key=p.energy)
    assert p.repair(best).tolist() == best.tolist()


def test_random_feasible_per_group_and_unchanged_when_ungrouped():
    p = grouped_cases()[1]
    seen = set()
    for seed in range(60):
        x = p.random_feasible(seed)
        assert p.is_feasible(x)
        seen.add(tuple(x))
    assert len(seen) > 10  # 3 * 5 = 15 feasible points, uniformly drawn
    q = random_problem(7, 3, seed=0)
    expected = np.zeros(7, dtype=np.int8)
    expected[np.random.default_rng(4).choice(7, 3, replace=False)] = 1
    assert q.random_feasible(4).tolist() == expected.tolist()


def test_grouped_scaled_and_derived_keep_groups():
    p = grouped_cases()[1]
    s, scale = p.scaled()
    assert np.array_equal(s.groups, p.groups)
    assert np.array_equal(s.group_counts, p.group_counts)
    x = p.random_feasible(0)
    assert s.energy(x) == pytest.approx(scale * p.energy(x))
    d = BlockProblem._derived(p.Q.copy(), p.group_counts, groups=p.groups)
    assert repr(d) == repr(p)
    assert not BlockProblem._derived(np.eye(2), 1).is_grouped


def test_random_problem_groups():
    p = random_problem(12, seed=3, group_size=4)
    assert p.groups.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert p.group_counts.tolist() == [2, 2, 2]
    assert np.array_equal(p.Q, random_problem(12, seed=3).Q)
    assert random_problem(12, [0, 1, 4], seed=3, group_size=4).k == 5
    assert not random_problem(4, 1, seed=0, group_size=4).is_grouped
    with pytest.raises(
        ProblemError, match="n = 10 must be a multiple of group_size = 4"
    ):
        random_problem(10, seed=0, group_size=4)
    with pytest.raises(ProblemError, match="group_size must be an integer >= 1, got 0"):
        random_problem(10, seed=0, group_size=0)


def test_grouped_npz_round_trip(tmp_path):
    p = grouped_cases()[1]
    p = BlockProblem(p.Q, p.group_counts, groups=p.groups, meta={"layer": "fc"})
    p.save(tmp_path / "g.npz")
    with np.load(tmp_path / "g.npz") as data:
        assert data["k"].tolist() == [1, 3, 0]
        assert data["groups"].tolist() == p.groups.tolist()
    q = BlockProblem.load(tmp_path / "g.npz")
    assert np.array_equal(p.Q, q.Q) and q.k == 4 and q.meta == {"layer": "fc"}
    assert np.array_equal(q.groups, p.groups)
    assert np.array_equal(q.group_counts, p.group_counts)
    assert BlockProblem.load(tmp_path / "g.npz", k=1).group_counts.tolist() == [1] * 3
    with pytest.raises(ProblemError, match=r"k for group 2 \(1 variable\).*got 3"):
        BlockProblem.load(tmp_path / "g.npz", k=3)
    with pytest.raises(ProblemError, match=r"meta keys \['groups'\] clash"):
        BlockProblem(np.eye(2), 1, meta={"groups": [0, 1]}).save(tmp_path / "m.npz")
    np.savez(tmp_path / "bad.npz", Q=np.eye(3), k=[1, 1], groups=[0, 2, 2])
    with pytest.raises(ProblemError, match="bad.npz': groups must use every id"):
        BlockProblem.load(tmp_path / "bad.npz")


def test_ungrouped_npz_has_no_groups_array(tmp_path):
    random_problem(4, 2, seed=0).save(tmp_path / "u.npz")
    with np.load(tmp_path / "u.npz") as data:
        assert sorted(data.files) == ["Q", "k"] and data["k"].ndim == 0


def test_grouped_ubqp_round_trip(tmp_path):
    p = grouped_cases()[1]
    p.to_ubqp(tmp_path / "g.ubqp")
    lines = (tmp_path / "g.ubqp").read_text().splitlines()
    assert lines[0] == "# groups = 2 0 1 1 0 1 0 1 1"
    assert lines[1] == "# k = 1 3 0" and lines[2].startswith("9 ")
    q = BlockProblem.load(tmp_path / "g.ubqp")
    assert np.allclose(p.Q, q.Q, rtol=1e-15) and repr(q) == repr(p)
    assert np.array_equal(q.groups, p.groups)
    assert BlockProblem.load(tmp_path / "g.ubqp", k=[0, 1, 1]).k == 2


@pytest.mark.parametrize(
    ("comments", "match"),
    [
        ("# k = 1 1\n", r"gives 2 counts \[1, 1\] but there is no '# groups"),
        ("# groups = 0 0 1\n# k = 1 1\n", r"shape \(4,\), got shape \(3,\)"),
        ("# groups = 0 x 1 1\n# k = 1\n", r"groups on line 1 .* >= 0, got 'x'"),
        ("# groups = 0 0 1 1\n# k = 1 3\n", r"k for group 1 \(2 variables\).*got 3"),
        ("# groups = 0 0 1 1\n", "no '# k = K' line"),
        ("# groups = 0 0 1 1\n# k =\n", r"k on line 2 .* >= 0, got ''"),
    ],
)
def test_malformed_grouped_ubqp(tmp_path, comments, match):
    path = tmp_path / "g.ubqp"
    path.write_text(comments + "4 1\n1 2 1.0\n")
    with pytest.raises(ProblemError, match=match):
        BlockProblem.load(path)
