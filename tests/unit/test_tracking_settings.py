"""The tracking server's programs read their settings through one declaration each
(tracking/settings.py): a missing or bad value is one line naming the variable."""

import pytest

from stack_common.settings import ConfigError, load
from tracking import settings

ENV = {
    "POSTGRES_DB": "mlflow", "MLFLOW_DB_USER": "mlflow_app", "MLFLOW_DB_PASSWORD": "p@ss/word",
    "POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "root", "OPTUNA_DB_PASSWORD": "o", "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask",
    "S3_BUCKET": "mlflow", "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret",
    "MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_ADMIN_PASSWORD": "admin-pw", "TRAINER_USERNAME": "trainer",
    "TRAINER_PASSWORD": "t", "SERVING_USERNAME": "serving", "SERVING_PASSWORD": "s",
    "EXPERIMENT_NAME": "fashion-mnist", "MODEL_NAME": "fashion-mnist-cnn",
}
HINT = " (run 'make env' to generate .env)"


def test_the_server_reads_its_defaults_and_quotes_its_password_into_the_uri():
    server = load(settings.Server, ENV)
    assert (server.workers, server.max_body_bytes, server.auth_cache_seconds) == (2, 512 * 1024**2, 30)
    assert server.uri(server.auth_db) == "postgresql+psycopg2://mlflow_app:p%40ss%2Fword@postgres:5432/mlflow_auth"
    assert "p@ss" not in repr(server)  # secrets never show in a repr or a log


@pytest.mark.parametrize(("change", "line"), [
    ({"MLFLOW_DB_PASSWORD": ""}, "MLFLOW_DB_PASSWORD is not set" + HINT),
    ({"MLFLOW_WORKERS": "many"}, "MLFLOW_WORKERS='many' is not valid: expected an integer from 1 to 64"),
    ({"MLFLOW_MAX_BODY_SIZE": "12q"},
     "MLFLOW_MAX_BODY_SIZE='12q' is not valid: expected a size such as 512m, 1g or a number of bytes"),
    ({"POSTGRES_PORT": "99999"}, "POSTGRES_PORT='99999' is not valid: expected an integer from 1 to 65535"),
])
def test_a_bad_server_setting_is_one_line_naming_it(change, line):
    with pytest.raises(ConfigError) as refused:
        load(settings.Server, {**ENV, **change}, missing_hint=HINT)
    assert str(refused.value) == line


def test_db_init_refuses_to_make_the_superuser_the_servers_role():
    with pytest.raises(ConfigError, match="MLFLOW_DB_USER must differ from POSTGRES_USER"):
        load(settings.DatabaseInit, {**ENV, "MLFLOW_DB_USER": "postgres"})


def test_the_servers_s3_key_comes_in_pairs():
    with pytest.raises(ConfigError, match="S3_APP_ACCESS_KEY and S3_APP_SECRET_KEY go together"):
        load(settings.BucketInit, {**ENV, "S3_APP_ACCESS_KEY": "app"})
    assert load(settings.BucketInit, ENV).app_access_key == ""


def test_each_program_asks_only_for_what_it_uses():
    """A one-shot helper never needs a secret it does not hold (compose gives each only its own)."""
    s3_only = {k: ENV[k] for k in ("S3_BUCKET", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    assert load(settings.BucketInit, s3_only).bucket == "mlflow"
    with pytest.raises(ConfigError, match="MLFLOW_ADMIN_USERNAME is not set"):
        load(settings.Server, s3_only)


def test_a_program_exits_2_with_the_line_on_stderr(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_DB_PASSWORD", raising=False)
    for name, value in ENV.items():
        if name != "MLFLOW_DB_PASSWORD":
            monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exited:
        settings.load(settings.DatabaseInit)
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"[mlflow-setup] configuration error: MLFLOW_DB_PASSWORD is not set{HINT}\n"


SSO = {"OIDC_DISCOVERY_URL": "https://idp.example.com/.well-known/openid-configuration",
       "OIDC_CLIENT_ID": "mlflow", "OIDC_CLIENT_SECRET": "from-the-provider",
       "OIDC_REDIRECT_URI": "https://mlflow.example.com/callback"}


def test_single_sign_on_adds_the_plugins_database_to_what_the_role_owns():
    assert load(settings.DatabaseInit, ENV).databases() == ("mlflow", "mlflow_auth")
    assert load(settings.DatabaseInit, {**ENV, "AUTH_MODE": "oidc"}).databases() == (
        "mlflow", "mlflow_auth", "mlflow_oidc")


@pytest.mark.parametrize(("change", "line"), [
    ({"AUTH_MODE": "saml"}, "AUTH_MODE='saml' is not valid: Input should be 'basic' or 'oidc' "
                             "(how people log in: MLflow's users, or single sign-on)"),
])
def test_an_unknown_auth_mode_is_one_line(change, line):
    with pytest.raises(ConfigError) as refused:
        load(settings.Server, {**ENV, **change})
    assert str(refused.value) == line


@pytest.mark.parametrize(("change", "line"), [
    ({"OIDC_CLIENT_SECRET": ""}, "OIDC_CLIENT_SECRET is not set"),
    ({"OIDC_DISCOVERY_URL": "idp.example.com"}, "OIDC_DISCOVERY_URL='idp.example.com' is not valid: "
                                                "expected an http(s):// URL"),
])
def test_single_sign_on_settings_are_checked_before_the_server_starts(change, line):
    assert load(settings.SingleSignOn, SSO).client_id == "mlflow"
    with pytest.raises(ConfigError) as refused:
        load(settings.SingleSignOn, {**SSO, **change})
    assert str(refused.value) == line


def test_service_accounts_need_no_password_and_list_the_groups_grants():
    env = {key: ENV[key] for key in ("POSTGRES_DB", "MLFLOW_DB_USER", "MLFLOW_DB_PASSWORD", "TRAINER_USERNAME",
                                     "SERVING_USERNAME", "EXPERIMENT_NAME", "MODEL_NAME")}
    accounts = load(settings.ServiceAccounts, {**env, "OIDC_READ_GROUPS": "readers, analysts,",
                                               "OIDC_EDIT_GROUPS": "ml-team"})
    assert accounts.group_grants() == [("readers", "READ"), ("analysts", "READ"), ("ml-team", "EDIT")]


@pytest.mark.parametrize("change", [{"OPTUNA_DB_USER": "mlflow_app"}, {"OPTUNA_DB_USER": "postgres"},
                                    {"OPTUNA_DB": "mlflow_auth"}, {"OPTUNA_DB": "postgres"}])
def test_sweeps_get_a_role_and_database_of_their_own(change):
    assert load(settings.DatabaseInit, ENV).optuna_db == "optuna"
    with pytest.raises(ConfigError, match="OPTUNA_DB"):
        load(settings.DatabaseInit, {**ENV, **change})
