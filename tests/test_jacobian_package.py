"""The package `jacobprop.jacobian` re-exports every operator module's names."""

import importlib

import pytest

import jacobprop as jp
import jacobprop.jacobian as package

MODULES = ["base", "basic", "spatial", "coupled"]


@pytest.mark.parametrize("name", MODULES)
def test_package_reexports_each_module_public_name(name):
    module = importlib.import_module(f"jacobprop.jacobian.{name}")
    for public in module.__all__:
        assert getattr(package, public) is getattr(module, public), (name, public)
        assert public in package.__all__, (name, public)


def test_package_all_is_the_union_of_the_modules():
    names = [
        public
        for name in MODULES
        for public in importlib.import_module(f"jacobprop.jacobian.{name}").__all__
    ]
    assert sorted(package.__all__) == sorted(names)


def test_top_level_operators_are_the_package_ones():
    for public in package.__all__:
        if hasattr(jp, public):
            assert getattr(jp, public) is getattr(package, public), public


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_operator"):
        package.no_such_operator  # noqa: B018
