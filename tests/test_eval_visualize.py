"""Each plot is a valid, non-empty PNG; grids and atoms against explicit constructions."""

import json

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F
from PIL import Image

from ctrl_csc.eval import visualize as V

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path) -> np.ndarray:
    with open(path, "rb") as fh:
        assert fh.read(8) == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        arr = np.asarray(im)
    assert arr.size > 0 and arr.shape[0] > 10 and arr.shape[1] > 10
    return arr


class FakeStage(torch.nn.Module):
    """The CSCLayer interface used by plot_dictionary: weight (C_out, C_in, k, k), stride,
    padding and synthesize(z, output_size) = conv_transpose2d with matching output_padding."""

    def __init__(self, c_in, c_out, k, stride=1, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(c_out, c_in, k, k, generator=g))
        self.stride, self.padding = stride, k // 2

    def synthesize(self, z, output_size):
        k, s, p = self.weight.shape[-1], self.stride, self.padding
        h = (z.shape[-2] - 1) * s - 2 * p + k
        w = (z.shape[-1] - 1) * s - 2 * p + k
        op = (output_size[0] - h, output_size[1] - w)
        return F.conv_transpose2d(z, self.weight, stride=s, padding=p, output_padding=op)


class FakeEncoder(torch.nn.Module):
    def __init__(self, stages):
        super().__init__()
        self.stages = torch.nn.ModuleList(stages)


def _atoms(stage):
    return stage.dictionary() if hasattr(stage, "dictionary") else stage.weight


def _composed_atom(stages, j):
    """D_0 … D_l e_j by explicit full 2-D convolutions (scipy), upsampling by zero insertion."""
    atom = _atoms(stages[-1])[j].detach().double().numpy()  # (C_l, k, k)
    for st in reversed(stages[:-1]):
        s = st.stride
        up = np.zeros((atom.shape[0], (atom.shape[1] - 1) * s + 1, (atom.shape[2] - 1) * s + 1))
        up[:, ::s, ::s] = atom
        w = _atoms(st).detach().double().numpy()  # (C_out = atom channels, C_in, k, k)
        atom = np.stack(
            [
                sum(
                    scipy.signal.convolve2d(up[c], w[c, ch], mode="full") for c in range(w.shape[0])
                )
                for ch in range(w.shape[1])
            ]
        )
    return atom


@pytest.mark.parametrize("stride0", [1, 2])
def test_dictionary_atoms_match_explicit_composition(stride0):
    stages = [FakeStage(3, 4, 3, stride=stride0, seed=1), FakeStage(4, 5, 3, stride=1, seed=2)]
    torch.testing.assert_close(V.dictionary_atoms(stages, 0), stages[0].weight.detach())
    atoms = V.dictionary_atoms(stages, 1, max_atoms=3)
    assert atoms.shape[:2] == (3, 3)
    for j in range(3):
        want = _composed_atom(stages, j)
        assert atoms[j].shape == want.shape
        np.testing.assert_allclose(atoms[j].double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_dictionary_atoms_three_stages_strided():
    stages = [
        FakeStage(1, 3, 5, stride=2, seed=3),
        FakeStage(3, 4, 3, 2, 4),
        FakeStage(4, 2, 3, 1, 5),
    ]
    atoms = V.dictionary_atoms(stages, 2)
    for j in range(2):
        want = _composed_atom(stages, j)
        np.testing.assert_allclose(atoms[j].double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_plot_dictionary_png(tmp_path):
    for c in (1, 3):
        enc = FakeEncoder([FakeStage(c, 8, 5, stride=2), FakeStage(8, 6, 3, stride=2, seed=1)])
        out = V.plot_dictionary(enc, tmp_path / f"dict{c}.png", max_atoms=4)
        assert out == tmp_path / f"dict{c}.png"
        _png(out)
    with pytest.raises(ValueError, match="stages"):
        V.plot_dictionary(torch.nn.Linear(2, 2), tmp_path / "x.png")


def test_plot_dictionary_real_csc_layer(tmp_path):
    nn_mod = pytest.importorskip("ctrl_csc.nn")
    if not hasattr(nn_mod, "CSCLayer"):
        pytest.skip("ctrl_csc.nn.CSCLayer not available yet")
    stages = [nn_mod.CSCLayer(1, 4, 3, stride=2), nn_mod.CSCLayer(4, 3, 3, stride=2)]
    with torch.no_grad():  # raw weights off the unit sphere: atoms are the normalised dictionary
        stages[0].weight.mul_(torch.tensor([3.0, 0.5, 1.0, 2.0]).view(-1, 1, 1, 1))
        stages[1].weight.mul_(4.0)
    torch.testing.assert_close(V.dictionary_atoms(stages, 0), stages[0].dictionary().detach())
    atoms = V.dictionary_atoms(stages, 1)
    for j in range(3):
        np.testing.assert_allclose(
            atoms[j].double().numpy(), _composed_atom(stages, j), rtol=1e-4, atol=1e-5
        )
    _png(V.plot_dictionary(FakeEncoder(stages), tmp_path / "csc.png"))


def test_save_image_grid_layout_and_values(tmp_path):
    imgs = torch.full((10, 1, 8, 8), -1.0)
    imgs[3] = 1.0
    out = V.save_image_grid(imgs, tmp_path / "sub" / "grid.png", nrow=4, padding=2)
    arr = np.asarray(Image.open(out))
    assert arr.shape == (3 * 10 + 2, 4 * 10 + 2)  # 3 rows, 4 columns of 8 px + 2 px padding
    assert arr[2:10, 2:10].max() == 0  # image 0: black
    assert arr[2:10, 32:40].min() == 255  # image 3: white
    assert arr[0].min() == 255  # padding is white
    rgb = V.save_image_grid(torch.rand(5, 3, 6, 6) * 2 - 1, tmp_path / "rgb.png", nrow=8)
    assert np.asarray(Image.open(rgb)).shape == (10, 5 * 8 + 2, 3)
    big = np.asarray(Image.open(V.save_image_grid(imgs, tmp_path / "big.png", nrow=4, scale=3)))
    np.testing.assert_array_equal(big, np.kron(arr, np.ones((3, 3), arr.dtype)))


def test_reconstruction_grid_alternates_rows(tmp_path):
    x = torch.full((6, 1, 4, 4), -1.0)  # inputs black
    xh = torch.full((6, 1, 4, 4), 5.0)  # reconstructions white (clamped)
    arr = np.asarray(Image.open(V.reconstruction_grid(x, xh, tmp_path / "rec.png", n=5, nrow=4)))
    # rows: inputs 0-3, recons 0-3, inputs 4 (+blank), recons 4 (+blank); tiles of 4 px + 2 px pad
    row_px = [2 + r * 6 for r in range(4)]
    assert arr[row_px[0] : row_px[0] + 4, 2:6].max() == 0
    assert arr[row_px[1] : row_px[1] + 4, 2:6].min() == 255
    assert arr[row_px[2] : row_px[2] + 4, 2:6].max() == 0
    assert arr[row_px[3] : row_px[3] + 4, 2:6].min() == 255
    with pytest.raises(ValueError, match="shapes differ"):
        V.reconstruction_grid(x, xh[:2], tmp_path / "bad.png")


def test_plot_densities(tmp_path):
    _png(
        V.plot_densities(
            {"density/enc0": 0.2, "density/enc1": 0.05, "density/dec0": None}, tmp_path / "d.png"
        )
    )
    _png(V.plot_densities([0.3, None, 0.1], tmp_path / "d2.png"))
    _png(V.plot_densities({}, tmp_path / "d3.png"))


def test_plot_curves_from_jsonl_and_list(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [
        {"step": i, "total": 1.0 - 0.01 * i, "decoder_total": 0.5 + 0.01 * i, "tag": "x"}
        for i in range(50)
    ]
    lines = [json.dumps(r) for r in recs]
    lines.insert(10, "{not json")
    lines.append(json.dumps({"step": 50, "total": float("nan")}))
    path.write_text("\n".join(lines) + "\n")
    _png(V.plot_curves(path, tmp_path / "c.png"))
    _png(V.plot_curves(str(path), tmp_path / "c2.png", keys=["total"]))
    _png(V.plot_curves(recs[:3], tmp_path / "c3.png"))
    _png(V.plot_curves([], tmp_path / "c4.png"))


@pytest.mark.parametrize("dim", [2, 3])
def test_plot_feature_subspaces(tmp_path, dim):
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 6, generator=g))[0]
    z = torch.cat(
        [torch.randn(40, 2, generator=g) @ basis[:, 2 * j : 2 * j + 2].T for j in range(3)]
    )
    z = z / z.norm(dim=1, keepdim=True)
    y = torch.arange(3).repeat_interleave(40)
    _png(V.plot_feature_subspaces(z, y, tmp_path / f"f{dim}.png", dim=dim))
    _png(V.plot_feature_subspaces(z, None, tmp_path / f"g{dim}.png", dim=dim))
    with pytest.raises(ValueError, match="dim"):
        V.plot_feature_subspaces(z, y, tmp_path / "h.png", dim=4)
