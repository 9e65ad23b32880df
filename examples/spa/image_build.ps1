# Builds the SPA example's app image in the seed's two steps (its build
# script built the nginx base image, then the app image FROM it): first the
# ringlb image from the repository's Dockerfile, then examples/spa/Dockerfile
# FROM that image. image_build.sh is the same for bash.
#
#   examples/spa/image_build.ps1 [-Engine docker|podman] [-BaseTag TAG]
#                                [-Tag TAG] [-SkipBase] [-BuildFlags FLAGS]
#
#   -Engine      docker or podman (default: docker if installed, else podman)
#   -BaseTag     the ringlb image (default ringlb:latest)
#   -Tag         the app image (default app-front:latest)
#   -SkipBase    build on an existing -BaseTag image instead of building it
#   -BuildFlags  passed to both builds, e.g. @('--pull=never')
#
# Then run it (Docker's and podman's default seccomp profiles block io_uring;
# the repository's profile allows it):
#   docker run --rm --security-opt seccomp=config/docker-seccomp.json -p 8080:8080 app-front
[CmdletBinding()]
param(
    [ValidateSet('', 'docker', 'podman')]
    [string]$Engine = '',
    [string]$BaseTag = 'ringlb:latest',
    [string]$Tag = 'app-front:latest',
    [switch]$SkipBase,
    [string[]]$BuildFlags = @()
)
Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$Here = $PSScriptRoot
$Repo = (Resolve-Path (Join-Path $Here '../..')).Path

if (-not $Engine) {
    if (Get-Command docker -ErrorAction SilentlyContinue) { $Engine = 'docker' }
    elseif (Get-Command podman -ErrorAction SilentlyContinue) { $Engine = 'podman' }
    else { throw 'image_build.ps1: neither docker nor podman is installed' }
}
# podman's default OCI image format has no HEALTHCHECK: the app image would
# lose the base image's.
$Format = @()
if ($Engine -eq 'podman') { $Format = @('--format', 'docker') }

# Native commands do not throw on failure: check each exit code.
function Invoke-Build([string[]]$BuildArgs) {
    Write-Host "== $Engine build $($BuildArgs -join ' ')"
    & $Engine build @BuildArgs
    if ($LASTEXITCODE -ne 0) { throw "$Engine build failed (exit $LASTEXITCODE)" }
}

if (-not $SkipBase) {
    Invoke-Build (@($Format) + @($BuildFlags) + @('-t', $BaseTag, $Repo))
}
Invoke-Build (@($Format) + @($BuildFlags) + @('--build-arg', "RINGLB_IMAGE=$BaseTag", '-t', $Tag, $Here))
Write-Host "built $Tag; run it with:"
Write-Host "  $Engine run --rm --security-opt seccomp=$(Join-Path $Repo 'config/docker-seccomp.json') -p 8080:8080 $Tag"
