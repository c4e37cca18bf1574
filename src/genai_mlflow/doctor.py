"""``genai-mlflow doctor``: checks the configuration end to end and says what to fix.

Each check prints ``ok`` or ``FAIL`` with a diagnosis and a fix. The checks run in order, and one
that cannot run because an earlier one failed says so.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from genai_mlflow.config import ConfigError, Settings

MIN_OTLP_VERSION = (3, 6)
DOCTOR_EXPERIMENT = "genai_mlflow_doctor"


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""


class _Failed(Exception):
    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _auth_fix() -> str:
    return (
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth) "
        "or MLFLOW_TRACKING_TOKEN (bearer token) to credentials the server accepts"
    )


_UNTRUSTED = "cannot verify the TLS certificate of"
_HANDSHAKE = "TLS handshake failed with"


def _tls_problem(exc: BaseException) -> str | None:
    """What went wrong in TLS, if that is what failed. MLflow's client re-raises requests' SSLError
    as a plain MlflowException with the cause in its text, so the text is read as well as the chain."""
    import ssl

    import requests

    text = str(exc)
    chain: BaseException | None = exc
    for _ in range(10):  # exception chains are short; the bound guards against a cycle
        if chain is None:
            break
        if isinstance(chain, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(chain):
            return _UNTRUSTED
        if isinstance(chain, ssl.SSLError | requests.exceptions.SSLError):
            return _HANDSHAKE
        chain = chain.__cause__ or chain.__context__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return _UNTRUSTED
    return _HANDSHAKE if "SSLError" in text else None


def _tls_fix(problem: str) -> str:
    if problem == _UNTRUSTED:
        return (
            "set MLFLOW_TRACKING_SERVER_CERT_PATH to the PEM file of the CA that signed the server's "
            "certificate (the certificate itself if it is self-signed); MLFLOW_TRACKING_INSECURE_TLS=true "
            "skips the check, for testing only"
        )
    return (
        "check that the server serves HTTPS on this port (use http:// if it does not), and its TLS "
        "set-up; MLFLOW_TRACKING_SERVER_CERT_PATH and MLFLOW_TRACKING_CLIENT_CERT_PATH set the CA "
        "bundle and a client certificate"
    )


class Doctor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.uri = settings.tracking_uri
        self.is_http = self.uri.startswith(("http://", "https://"))
        self.experiment_id: str | None = None
        self.run_id: str | None = None
        self.server_ok = False  # later checks need the server: MLflow's client retries for minutes

    def _http(self, method: str, endpoint: str, **kwargs: object) -> object:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            response = http_request(
                get_default_host_creds(self.uri),
                endpoint,
                method,
                max_retries=0,
                backoff_factor=0,
                timeout=10,
                **kwargs,
            )
        except Exception as exc:
            tls = _tls_problem(exc)
            if tls is not None:
                raise _Failed(f"{tls} {self.uri}: {exc}", _tls_fix(tls)) from exc
            raise _Failed(
                f"cannot reach {self.uri}: {exc}",
                "start the MLflow server, or fix MLFLOW_TRACKING_URI (scheme, host and port)",
            ) from exc
        if response.status_code in (401, 403):
            raise _Failed(f"{endpoint} answered {response.status_code}: not authorised", _auth_fix())
        return response

    def check_uri(self) -> str:
        scheme = self.uri.split(":", 1)[0]
        if (
            scheme not in ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file")
            and "+" not in scheme
        ):
            raise _Failed(
                f"unsupported tracking URI scheme {scheme!r} in {self.uri}",
                "use http(s)://host:port for a server, or sqlite:///mlflow.db",
            )
        if scheme == "file":
            raise _Failed("the file store has no trace store", "use sqlite:///mlflow.db or an MLflow server")
        return self.uri

    def check_server(self) -> str:
        if not self.is_http:
            import mlflow

            self.server_ok = True
            return f"embedded store, MLflow {mlflow.__version__} in this process"
        response = self._http("GET", "/version")
        status = getattr(response, "status_code", 0)
        if status != 200:
            raise _Failed(f"/version answered {status}", "check that the URI points at an MLflow server")
        version = str(getattr(response, "text", "")).strip()
        if _version_tuple(version) < MIN_OTLP_VERSION:
            raise _Failed(
                f"MLflow server {version} has no OTLP trace ingest (needs 3.6 or newer)",
                "upgrade the server: pip install 'mlflow>=3.6,!=3.18.0'",
            )
        self.server_ok = True
        return f"MLflow server {version}"

    def check_permissions(self) -> str:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if not self.server_ok:
            raise _Failed("skipped: the server check failed", "fix the checks above first")
        client = MlflowClient(self.uri)
        try:
            experiment = client.get_experiment_by_name(DOCTOR_EXPERIMENT)
            if experiment is None:
                self.experiment_id = client.create_experiment(DOCTOR_EXPERIMENT)
            else:
                self.experiment_id = experiment.experiment_id
                if experiment.lifecycle_stage == "deleted":
                    client.restore_experiment(self.experiment_id)
            self.run_id = client.create_run(self.experiment_id, run_name="doctor").info.run_id
        except MlflowException as exc:
            text = str(exc)
            if "401" in text or "403" in text or "PERMISSION_DENIED" in text or "UNAUTHENTICATED" in text:
                raise _Failed(
                    f"not allowed to create experiments or runs: {text[:300]}", _auth_fix()
                ) from exc
            raise _Failed(
                f"cannot create an experiment and a run: {text[:300]}",
                "check the server's logs and its backend store",
            ) from exc
        return f"created a run in experiment {DOCTOR_EXPERIMENT!r}"

    def check_artifacts(self) -> str:
        from mlflow import MlflowClient

        if self.run_id is None:
            raise _Failed("skipped: no run to write to", "fix the checks above first")
        client = MlflowClient(self.uri)
        text = f"genai-mlflow doctor {uuid.uuid4()}"
        try:
            client.log_text(self.run_id, text, "doctor/check.txt")
            local = client.download_artifacts(self.run_id, "doctor/check.txt")
            with open(local, encoding="utf-8") as handle:
                read_back = handle.read()
        except Exception as exc:
            raise _Failed(
                f"cannot write or read an artifact: {str(exc)[:300]}",
                "check the server's --artifacts-destination, its S3 credentials and "
                "MLFLOW_S3_ENDPOINT_URL (for MinIO), or the local artifact directory's permissions",
            ) from exc
        if read_back != text:
            raise _Failed("an artifact read back differs from what was written", "check the artifact store")
        return "wrote and read back an artifact"

    def check_traces(self) -> str:
        if self.experiment_id is None:
            raise _Failed("skipped: no experiment to write to", "fix the checks above first")
        if not self.is_http:
            return "traces are written to the embedded store directly"
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        response = self._http(
            "POST",
            "/v1/traces",
            data=ExportTraceServiceRequest().SerializeToString(),
            extra_headers={
                "Content-Type": "application/x-protobuf",
                "x-mlflow-experiment-id": self.experiment_id,
            },
        )
        status = getattr(response, "status_code", 0)
        text = str(getattr(response, "text", ""))
        # Newer servers (3.17) parse the empty request and reject it for having no spans: the
        # endpoint is there and reads OTLP, which is what this check is after.
        if status != 200 and not (status == 400 and "no spans" in text.lower()):
            raise _Failed(
                f"/v1/traces answered {status}: {text[:300]}",
                "upgrade the MLflow server to 3.6 or newer, and check a proxy in front of it",
            )
        return "OTLP endpoint /v1/traces accepts traces"

    def check_spool(self) -> str:
        from genai_mlflow.exporter.spool import Spool

        directory = self.settings.spool_dir
        try:
            directory.mkdir(parents=True, exist_ok=True)
            probe = directory / f".doctor-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise _Failed(
                f"spool directory {directory} is not writable: {exc}",
                "set GENAI_MLFLOW_SPOOL_DIR to a writable directory",
            ) from exc
        spool = Spool(directory, max_bytes=self.settings.spool_max_bytes)
        try:
            status = spool.status()
        finally:
            spool.close()
        detail = (
            f"{directory}: {status.pending_records} records waiting ({status.bytes} bytes of "
            f"{self.settings.spool_max_bytes}), {status.dropped} dropped"
        )
        if status.bytes > 0.9 * self.settings.spool_max_bytes:
            raise _Failed(
                detail + ": nearly full, new spans will be dropped",
                "fix MLflow connectivity, then run `genai-mlflow spool replay`; "
                "or raise GENAI_MLFLOW_SPOOL_MAX_BYTES",
            )
        return detail

    def cleanup(self) -> None:
        if self.run_id is None:
            return
        try:
            from mlflow import MlflowClient

            MlflowClient(self.uri).delete_run(self.run_id)
        except Exception:
            pass  # best effort: the doctor's own run


def run_doctor(out: TextIO, tracking_uri: str | None = None) -> int:
    """Prints one line per check; returns 0 when all pass, 1 otherwise."""
    try:
        settings = Settings.resolve(tracking_uri)
    except ConfigError as exc:
        print(f"FAIL configuration: {exc}", file=out)
        return 1
    doctor = Doctor(settings)
    print(f"genai-mlflow doctor: tracking URI {settings.tracking_uri}", file=out)
    checks: list[tuple[str, Callable[[], str]]] = [
        ("tracking URI", doctor.check_uri),
        ("server", doctor.check_server),
        ("permissions", doctor.check_permissions),
        ("artifact store", doctor.check_artifacts),
        ("trace ingest", doctor.check_traces),
        ("spool", doctor.check_spool),
    ]
    findings: list[Finding] = []
    for name, check in checks:
        started = time.monotonic()
        try:
            detail = check()
            findings.append(Finding(name, True, detail))
            print(f"ok   {name}: {detail} ({(time.monotonic() - started) * 1000:.0f} ms)", file=out)
        except _Failed as failed:
            findings.append(Finding(name, False, failed.detail, failed.fix))
            print(f"FAIL {name}: {failed.detail}\n     fix: {failed.fix}", file=out)
        except Exception as exc:  # a check's own bug still gives a readable line
            findings.append(Finding(name, False, repr(exc)))
            print(f"FAIL {name}: unexpected error {exc!r}", file=out)
    doctor.cleanup()
    return 0 if all(f.ok for f in findings) else 1
