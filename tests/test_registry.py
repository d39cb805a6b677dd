"""The solver and method registries: every registered method builds, the names and the CLI help come from the
registries, each solver returns the record type it declares, and an IIA basis on a solver whose records lack
its fields is refused when the method is built."""

import dataclasses
from types import MappingProxyType

import pytest
import torch

from iia_cli.core import methods
from iia_cli.core.methods import IIA_METHODS, METHOD_NAMES, METHODS, Method, MethodSpec, make_method
from iia_cli.core.sampling import BoundDenoiser
from iia_cli.core.solvers.base import CONVENTIONS, push
from iia_cli.core.solvers.heun import HeunRecord
from iia_cli.core.solvers.registry import BASE_SOLVER_NAMES, SOLVER_ALIASES, SOLVERS, make_solver
from iia_cli.models.gaussian import GaussianModel
from iia_cli.runtime.errors import ConfigError


def _variants(spec: MethodSpec):
    """Every combination of a method's parameter choices, as make_method keywords."""
    combos = [{}]
    for key, param in spec.params.items():
        combos = [{**c, key: v} for c in combos for v in param.choices]
    return combos


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_registered_method_builds_on_its_base_solver(name, convention):
    spec = METHODS[name]
    for kw in _variants(spec):
        for guided in (False, True):
            m = make_method(name, guided=guided, convention=convention, **kw)
            assert m.name == name and m.solver.name == spec.base and m.solver.convention == convention
            assert m.is_iia == (name in IIA_METHODS) == spec.is_iia
            assert issubclass(m.solver.record_type, m.basis.needs) if m.is_iia else m.basis is None
            form = {"form": "guided"} if guided and spec.guided is not None else kw
            assert m.params == {**form, **({"convention": convention} if convention != "iia" else {})}


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_iia_methods_are_the_ones_with_a_correction(name):
    """IIA_METHODS is what behaves as IIA: its methods propose correction quantities along a trajectory and move
    the sample when given coefficients; a base method proposes none and ignores coefficients."""
    from iia_cli.core.grids import make_karras_grid
    from iia_cli.core.sampling import commit, propose

    method, den = make_method(name), BoundDenoiser(GaussianModel(shape=(1, 4, 4), std=0.5))
    sig = make_karras_grid(8, 0.5, 80.0)
    x, hist, corrected = torch.randn(2, 1, 4, 4, dtype=torch.float64) * 80, (), 0
    for i in range(len(sig) - 1):
        step = propose(method, den, x, sig, i, hist)
        if step.quantities is not None and len(step.quantities):
            moved, _ = commit(step, hist, [0.1] * len(step.quantities))
            corrected += not torch.equal(moved, step.x_base)
        x, hist = commit(step, hist)
    assert (corrected > 0) == (name in IIA_METHODS), corrected


def test_names_choices_and_help_come_from_the_registries():
    from iia_cli.cli.app import METHOD_HELP, METHODS_EPILOG

    assert BASE_SOLVER_NAMES == tuple(SOLVERS) and METHOD_NAMES == tuple(METHODS)
    assert METHOD_NAMES[: len(BASE_SOLVER_NAMES)] == BASE_SOLVER_NAMES  # every solver is a method
    assert SOLVER_ALIASES == {"euler": "ddim", "heun": "edm"}
    assert methods.R_CHOICES == {"iia-edm": (0, 1, 2), "biia-edm": (0, 1)}
    assert f"Sampling method: {', '.join(METHOD_NAMES)} (aliases euler=ddim, heun=edm)." == METHOD_HELP
    lines = METHODS_EPILOG.splitlines()[2:]
    assert [line.split()[0] for line in lines] == list(METHOD_NAMES)
    assert "sampler.r: 0|1|2 (default 1)" in lines[METHOD_NAMES.index("iia-edm")]
    assert "on ipndm:" in lines[METHOD_NAMES.index("iia-ipndm")]
    with pytest.raises(ConfigError, match=r"unknown method 'nope'; choose one of ddim, edm, .*iia-unipc "
                                          r"\(aliases: euler=ddim, heun=edm\)"):
        make_method("nope")
    assert make_method("heun").name == "edm" and make_solver("euler").name == "ddim"


def test_method_list_shows_in_the_cli_help(cli):
    out = cli(["calibrate", "--help"]).output
    for name in METHOD_NAMES:
        assert f"\n  {name} " in out, name
    assert "sampler.quantities: 1|2 (default 2)" in out


@pytest.mark.parametrize(("name", "kw", "message"), [
    ("iia-edm", {"r": 3}, "sampler.r=3 is not valid for iia-edm; choose one of 0, 1, 2"),
    ("biia-edm", {"r": 2}, "sampler.r=2 is not valid for biia-edm; choose one of 0, 1"),
    ("iia-ddim", {"quantities": 3}, "sampler.quantities=3 is not valid for iia-ddim; choose one of 1, 2"),
    ("iia-ipndm", {"quantities": 0}, "sampler.quantities=0 is not valid for iia-ipndm; choose one of 1, 2"),
])
def test_parameter_outside_its_choices_is_refused(name, kw, message):
    with pytest.raises(ConfigError) as e:
        make_method(name, **kw)
    assert str(e.value) == message


def test_a_basis_on_a_solver_without_its_record_fails_when_the_method_is_built(monkeypatch):
    """IIA-EDM's quantities read u, v of Heun records; registered on DDIM (plain records) the method must not
    build, rather than fail at the first corrected step of a calibration."""
    bad = MethodSpec("ddim", "IIA-EDM's basis on DDIM", METHODS["iia-edm"].basis, METHODS["iia-edm"].params)
    monkeypatch.setattr(methods, "METHODS", MappingProxyType({**METHODS, "iia-bad": bad}))
    with pytest.raises(ConfigError) as e:
        methods.make_method("iia-bad")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == ("method iia-bad: its IIA quantities read HeunRecord (u, v, slope), but solver ddim records "
                   "StepRecord; base it on a solver that records them")
    # the same check on a method put together by hand: IIA-iPNDM's combined estimates on DPM-Solver++(2M)
    with pytest.raises(ConfigError, match=r"read IPNDMRecord \(eps_comb, denoised_comb\), but solver "
                                          r"dpm-solver\+\+-2m records LambdaRecord"):
        Method("x", make_solver("dpm-solver++-2m"), METHODS["iia-ipndm"].basis(quantities=2))
    # a record type that has the fields (a subclass) is accepted: the plain-record bases run on every solver
    for base in BASE_SOLVER_NAMES:
        assert Method("x", make_solver(base), METHODS["iia-dpm-solver++-2m"].basis()).is_iia


@pytest.mark.parametrize("name", BASE_SOLVER_NAMES)
def test_each_solver_returns_the_record_type_it_declares(name):
    model = GaussianModel(shape=(1, 4, 4), std=0.5)
    solver = make_solver(name)
    sigmas = torch.tensor([80.0, 10.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80
    den, history = BoundDenoiser(model), ()
    for i in range(len(sigmas) - 1):
        res = solver.step(den, x, sigmas, i, history)
        rec = res.record
        assert type(rec) is solver.record_type
        assert rec.sigma == float(sigmas[i])
        torch.testing.assert_close(rec.eps, (x - rec.denoised) / rec.sigma, rtol=1e-12, atol=0)
        with pytest.raises(dataclasses.FrozenInstanceError):
            rec.sigma = 1.0
        history, x = push(history, rec), res.x_next
    if name == "edm":  # Heun: v is None only on the Euler step to sigma = 0
        assert [r.v is None for r in history] == [False, False, False, True]
        assert isinstance(history[0], HeunRecord)


def test_method_parameters_are_generic() -> None:
    """Every registered method parameter is a sampler key of the schema and reaches its method through the API by
    its name alone; an unknown one is refused; labels follow the registry's ``always_shown`` and defaults."""
    from iia_cli.config.experiment import SamplerConfig
    from iia_cli.core.methods import PARAM_KEYS, shown_params

    assert PARAM_KEYS == ("quantities", "r")
    assert set(PARAM_KEYS) <= set(SamplerConfig.model_fields)
    assert make_method("iia-ddim", quantities=1).params == {"quantities": 1}
    assert make_method("iia-edm", r=2, quantities=1).params == {"r": 2}  # a method ignores what it does not take
    with pytest.raises(ConfigError, match="unknown method parameter.*rr; the registered ones are quantities, r"):
        make_method("iia-edm", rr=1)
    assert shown_params({"r": 1, "quantities": 2, "convention": "iia"}) == {"r": 1}  # r always, quantities at 2 not
    assert shown_params({"quantities": 1}) == {"quantities": 1}


def test_sampler_method_parameters_reach_the_method(write_config) -> None:
    from iia_cli.api import prepare
    from iia_cli.config.experiment import load_config

    cfg = load_config(write_config({"model": {"kind": "gaussian", "shape": [1, 4, 4]},
                                    "sampler": {"method": "iia-ddim", "nfe": 5, "quantities": 1}}))
    assert prepare(cfg).method.params == {"quantities": 1}


def test_capabilities_read_every_optional_hook_with_its_default() -> None:
    """A bare denoiser gets every default; an adapter declares a capability by having the attribute."""
    from iia_cli.models.base import Capabilities, capabilities, round_sigmas

    class Bare:
        shape, sigma_min, sigma_max = (1, 2, 2), 0.01, 10.0

        def __call__(self, x, sigma, class_labels=None):
            return x

    assert capabilities(Bare()) == Capabilities()
    s = torch.tensor([2.0, 1.0], dtype=torch.float64)
    assert round_sigmas(Bare(), s) is s

    class Rich(Bare):
        label_dim, dtype, guided = 10, torch.float16, True
        discrete_sigmas = torch.ones(3)

        def round_sigma(self, sigma):
            return torch.round(sigma)

        def sigma_to_t(self, sigma):  # without t_to_sigma the model's own time is not usable
            return sigma

    caps = capabilities(Rich())
    assert (caps.label_dim, caps.dtype, caps.guided, caps.sigma_to_t) == (10, torch.float16, True, None)
    assert caps.discrete_sigmas is Rich.discrete_sigmas and caps.round_sigma is not None
    assert round_sigmas(Rich(), torch.tensor([1.4, 0.6], dtype=torch.float64)).tolist() == [1.0, 1.0]
