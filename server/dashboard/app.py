"""The dashboard's routes: pages, the live run stream, sign-in, and actions behind a confirmation.

Mounted at `/dashboard` by `engrain serve --http` (beside `/mcp`, in the process that owns the store) and by
`engrain dashboard`. Pages read the same views the MCP tools return; actions call `server.actions`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, get_args

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import actions
from server.dashboard.auth import (
    COOKIE,
    SESSION_MAX_AGE_S,
    Guard,
    Session,
    cross_site_reason,
    csrf_reason,
    host_allowed,
)
from server.dashboard.render import render
from server.state import AppState, StateRef
from server.views import experiences as experience_views
from server.views.history import kernel_history
from server.views.kernels import kernel_row, overview
from server.views.runs import RunDetail, recent_runs, run_detail
from store.errors import NotFound, StoreError
from store.models import ExperienceSource, ExperienceStatus
from train_worker.deploy import DeployError, KernelFiles
from train_worker.protocol import check_kernel_name, check_run_id

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
STREAM_POLL_S = 1.0
STREAM_KEEPALIVE_S = 15.0
REVIEW_LIMIT = 200

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; connect-src 'self'; "
        b"form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),  # no-referrer would make the browser send Origin: null
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


class Refused(Exception):
    """A request the dashboard turns down, with the status and the reason to show."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


Handler = Callable[[Request, Session], Awaitable[Response]]


class Dashboard:
    def __init__(self, ref: StateRef, token: str, allowed_hosts: tuple[str, ...] = ()) -> None:
        self.ref = ref
        self.guard = Guard(token)
        self.allowed_hosts = allowed_hosts

    @property
    def state(self) -> AppState:
        return self.ref.state

    # -- plumbing ---------------------------------------------------------------------------------

    def app(self) -> ASGIApp:
        page = self._page
        routes = [
            Route("/", page(self.kernels_page)),
            Route("/login", self.login_form, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", page(self.logout, post=True), methods=["POST"]),
            Route("/runs", page(self.runs_page)),
            Route("/runs/{run_id}", page(self.run_page)),
            Route("/runs/{run_id}/stream", page(self.run_stream)),
            Route("/kernels/{name}", page(self.kernel_page)),
            Route("/kernels/{name}/experiences", page(self.experiences_page)),
            Route("/kernels/{name}/review", page(self.review_page)),
            Route("/confirm/{action}", page(self.confirm_page)),
            Route("/actions/{action}", page(self.act, post=True), methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
        return _Headers(Starlette(routes=routes), self.allowed_hosts)

    def _page(self, handler: Handler, post: bool = False) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = self.guard.authenticate(request)
            if session is None:
                return self._login_response(request, status=401)
            try:
                if post:
                    await self._check_post(request, session)
                return await handler(request, session)
            except Refused as exc:
                return self._error(request, session, exc.status, str(exc))
            except (StoreError, DeployError, actions.ActionRefused) as exc:
                status = 404 if isinstance(exc, NotFound) else 409
                return self._error(request, session, status, str(exc))
            except ValueError as exc:
                return self._error(request, session, 400, str(exc))

        return endpoint

    async def _check_post(self, request: Request, session: Session) -> None:
        reason = cross_site_reason(request)
        if reason:
            raise Refused(403, f"refused a cross-site request: {reason}")
        form = await request.form()
        submitted = form.get("csrf")
        reason = csrf_reason(session, submitted if isinstance(submitted, str) else None)
        if reason:
            raise Refused(403, reason)

    def _base(self, request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    def _context(self, request: Request, session: Session | None) -> dict[str, Any]:
        return {
            "base": self._base(request),
            "csrf": session.csrf if session else None,
            "session": session,
            "estop_since": actions.estop_since(self.state.layout) if session else None,
        }

    def _html(self, request: Request, session: Session | None, template: str, code: int = 200, **ctx: Any) -> Response:
        return HTMLResponse(render(template, **self._context(request, session), **ctx), status_code=code)

    def _error(self, request: Request, session: Session, status: int, message: str) -> Response:
        return self._html(request, session, "error.html", code=status, status_code=status, message=message)

    def _login_response(self, request: Request, status: int, error: str | None = None) -> Response:
        wants = request.url.path if request.method == "GET" and not request.url.path.endswith("/stream") else ""
        response = HTMLResponse(
            render("login.html", base=self._base(request), csrf=None, session=None, estop_since=None, error=error,
                   next=wants),
            status_code=status,
        )  # fmt: skip
        if status == 401:
            response.headers["www-authenticate"] = 'Bearer realm="engrain dashboard"'
        return response

    # -- sign-in ----------------------------------------------------------------------------------

    async def login_form(self, request: Request) -> Response:
        return self._login_response(request, status=200)

    async def login(self, request: Request) -> Response:
        reason = cross_site_reason(request)
        if reason:
            return self._login_response(request, status=403, error=f"refused a cross-site sign-in: {reason}")
        form = await request.form()
        token = form.get("token")
        if not isinstance(token, str) or not self.guard.token_ok(token.strip()):
            return self._login_response(request, status=401, error="that is not this server's token")
        base = self._base(request)
        wanted = form.get("next")
        target = wanted if isinstance(wanted, str) and wanted.startswith(base + "/") and "//" not in wanted else ""
        response = RedirectResponse(target or f"{base}/", status_code=303)
        response.set_cookie(
            COOKIE,
            self.guard.new_cookie(),
            max_age=SESSION_MAX_AGE_S,
            path=base or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    async def logout(self, request: Request, session: Session) -> Response:
        base = self._base(request)
        response = RedirectResponse(f"{base}/login", status_code=303)
        response.delete_cookie(COOKIE, path=base or "/")
        return response

    # -- pages ------------------------------------------------------------------------------------

    async def kernels_page(self, request: Request, session: Session) -> Response:
        return self._html(request, session, "kernels.html", overview=await overview(self.state))

    async def kernel_page(self, request: Request, session: Session) -> Response:
        name = check_kernel_name(request.path_params["name"])
        row = await kernel_row(self.state, name)
        return self._html(
            request,
            session,
            "kernel.html",
            row=row,
            history=await kernel_history(self.state, name),
            runs=await recent_runs(self.state, name, limit=20),
        )

    async def runs_page(self, request: Request, session: Session) -> Response:
        return self._html(request, session, "runs.html", runs=await recent_runs(self.state, limit=100))

    async def run_page(self, request: Request, session: Session) -> Response:
        detail = await run_detail(self.state, check_run_id(request.path_params["run_id"]))
        return self._html(request, session, "run.html", detail=detail)

    async def experiences_page(self, request: Request, session: Session) -> Response:
        name = check_kernel_name(request.path_params["name"])
        q = request.query_params
        source = _choice(q.get("source"), ExperienceSource)
        status = _choice(q.get("status"), ExperienceStatus)
        offset = max(0, _int(q.get("offset"), 0))
        page = await experience_views.search(self.state, name, q.get("q", "")[:200], source, status, offset)
        return self._html(
            request,
            session,
            "experiences.html",
            page=page,
            q=q.get("q", ""),
            source=source or "",
            status=status or "",
            sources=get_args(ExperienceSource),
            statuses=get_args(ExperienceStatus),
        )

    async def review_page(self, request: Request, session: Session) -> Response:
        name = check_kernel_name(request.path_params["name"])
        queue = await experience_views.review_queue(self.state, name, REVIEW_LIMIT)
        return self._html(request, session, "review.html", queue=queue)

    # -- the live run -----------------------------------------------------------------------------

    async def run_stream(self, request: Request, session: Session) -> Response:
        """Server-sent events: the run's live panel as HTML whenever it changes, then `end`."""
        run_id = check_run_id(request.path_params["run_id"])
        await self.state.store.runs.get(run_id)
        base = self._base(request)

        async def stream() -> AsyncIterator[str]:
            seen: tuple[Any, ...] = ()
            quiet = 0.0
            while True:
                detail = await run_detail(self.state, run_id)
                key = _fingerprint(detail)
                if key != seen:
                    seen, quiet = key, 0.0
                    yield _sse("update", render("_run_live.html", base=base, detail=detail, csrf=session.csrf))
                elif quiet >= STREAM_KEEPALIVE_S:
                    quiet = 0.0
                    yield ": keep-alive\n\n"
                if not detail.active:
                    yield _sse("end", detail.run.status)
                    return
                await anyio.sleep(STREAM_POLL_S)
                quiet += STREAM_POLL_S

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"x-accel-buffering": "no"})

    # -- actions ----------------------------------------------------------------------------------

    async def confirm_page(self, request: Request, session: Session) -> Response:
        action = request.path_params["action"]
        q = request.query_params
        fields: dict[str, str] = {}
        base = self._base(request)
        back = f"{base}/"
        if action == "rollback":
            name = check_kernel_name(q.get("kernel", ""))
            files = KernelFiles(self.state.layout, name)
            current = files.current()
            raw = q.get("version")
            if raw:
                target = _int(raw, -1)
                if target < 0:
                    raise Refused(400, f"version {raw!r} is not a number")
            elif current is None:
                raise Refused(409, f"{name} already serves the bare base model; there is nothing to roll back")
            else:
                target = files.rollback_target() or 0  # nothing older: the bare base model
            fields = {"kernel": name, "version": str(target)}
            back = f"{base}/kernels/{name}"
            title = f"Roll back {name}?"
            text = (
                f"{name} serves {actions.version_name(current)} now. After this it serves "
                f"{actions.version_name(target or None)}; the model host follows within a second. Nothing is "
                "deleted: you can roll forward again the same way."
            )
        elif action == "cancel":
            run = await self.state.store.runs.get(check_run_id(q.get("run", "")))
            fields = {"run": run.id}
            back = f"{base}/runs/{run.id}"
            title = f"Cancel run {run.id}?"
            text = (
                f"The run is {run.status}. A run the worker has not started ends at once; one in training stops "
                "at its next step and nothing is deployed. Its experiences stay untrained for a later run."
            )
        elif action == "reset-breaker":
            name = check_kernel_name(q.get("kernel", ""))
            row = await kernel_row(self.state, name)
            fields = {"kernel": name}
            back = f"{base}/kernels/{name}"
            title = f"Reset the circuit breaker of {name}?"
            text = (
                f"{row.auto.consecutive_failures} failed runs in a row count now. After the reset they no longer "
                "count, and automatic training may start again if it is due. Reset it once the cause is fixed."
            )
        elif action == "estop-on":
            title = "Turn the e-stop on?"
            text = (
                "No new run starts, manual or automatic, until it is turned off. A run already queued or training "
                "goes on: cancel it to stop it."
            )
        elif action == "estop-off":
            title = "Turn the e-stop off?"
            text = "Training may start again: manual runs at once, automatic runs when their policy says so."
        else:
            raise Refused(404, f"no action named {action!r}")
        return self._html(
            request, session, "confirm.html", action=action, title=title, text=text, fields=fields, back=back
        )

    async def act(self, request: Request, session: Session) -> Response:
        action = request.path_params["action"]
        form = await request.form()
        if form.get("confirm") != "yes":
            raise Refused(400, "this action needs its confirmation: open it from the dashboard and confirm")
        state = self.state
        base = self._base(request)
        back = f"{base}/"
        if action == "rollback":
            name = check_kernel_name(str(form.get("kernel", "")))
            raw = form.get("version")
            version = _int(str(raw), -1) if raw else None
            if version is not None and version < 0:
                raise Refused(400, f"version {raw!r} is not a number")
            result = await actions.rollback(state, name, version, via="dashboard")
            message, back = result.message, f"{base}/kernels/{name}"
        elif action == "cancel":
            run = await actions.cancel(state, str(form.get("run", "")))
            message = (
                f"cancel requested: run {run.id} stops at the worker's next step"
                if run.active
                else f"run {run.id} is {run.status}"
            )
            back = f"{base}/runs/{run.id}"
        elif action == "reset-breaker":
            name = check_kernel_name(str(form.get("kernel", "")))
            await actions.reset_breaker(state, name)
            message, back = f"the circuit breaker of {name} is reset", f"{base}/kernels/{name}"
        elif action == "estop-on":
            changed = actions.estop_on(state.layout, via="dashboard")
            message = "e-stop on: no run starts until it is turned off" if changed else "the e-stop was already on"
        elif action == "estop-off":
            changed = actions.estop_off(state.layout, via="dashboard")
            message = "e-stop off: training may start again" if changed else "the e-stop was already off"
        else:
            raise Refused(404, f"no action named {action!r}")
        log.warning("dashboard action %s: %s", action, message)
        return self._html(request, session, "done.html", message=message, back=back)


def _fingerprint(detail: RunDetail) -> tuple[Any, ...]:
    r = detail.run
    return (r.status, r.phase, r.step, r.message, r.error, len(detail.points), len(detail.phases))


def _sse(event: str, data: str) -> str:
    lines = "".join(f"data: {line}\n" for line in data.splitlines() or [""])
    return f"event: {event}\n{lines}\n"


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def _choice(value: str | None, literal: Any) -> Any:
    if not value:
        return None
    if value not in get_args(literal):
        raise ValueError(f"{value!r} is not one of {', '.join(get_args(literal))}")
    return value


class _Headers:
    """Refuses unknown Host headers (DNS rebinding) and adds the security headers to every response."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if not host_allowed(host, self.allowed_hosts):
            response = Response(
                f"host {host!r} is not allowed; start the server with --allowed-host {host or 'NAME:PORT'}",
                status_code=421,
            )
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)
