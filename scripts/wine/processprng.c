/*
 * A stand-in for Windows' bcryptprimitives.dll under Wine 8, which lacks `ProcessPrng`.
 * Rust's std on Windows (since 1.78) takes its random bytes (HashMap keys) from
 * `ProcessPrng`; without it every Rust program fails to start under Wine 8. This DLL exports
 * that one function and fills the buffer from `RtlGenRandom` (advapi32's SystemFunction036),
 * which Wine has. It is placed next to the .exe only when running under Wine (scripts/wine.sh);
 * it is never shipped.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG part = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, part))
            return FALSE;
        data += part;
        len -= part;
    }
    return TRUE;
}
