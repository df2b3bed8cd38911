/*
 * teredo_reference.sys: the job of examples/teredo-monitor, written as a C WDM driver.
 *
 * DriverEntry registers for Teredo port changes with the initial notification, seeds the
 * port with GetTeredoPort, and keeps the current port in one interlocked 64-bit variable;
 * the notification callback updates it; DriverUnload cancels the registration and frees the
 * context. TeredoMonitorClassifyPort (exported) stands in for a WFP classify function: it
 * reads the current port at any IRQL <= DISPATCH_LEVEL; TeredoClassify (exported) is the
 * per-packet exception check such a function makes.
 *
 * It is the harness's foreign driver: built with mingw-w64 (build.sh), it imports
 * ExAllocatePoolWithTag and DbgPrintEx, reads the IRQL with the KeGetCurrentIrql() the DDK
 * headers inline (mov rax, cr8), and has no base relocations. docs/harness.md says how it
 * runs in kernel-box.
 */
#include <ntddk.h>

#include "netio_teredo.h"

/* 'TRef' as it reads in a pool dump (the first character is the lowest byte). */
#define TEREDO_REFERENCE_TAG 'feRT'

/*
 * State packs the port (bits 0-15, 0 when the client runs on no port) with a generation
 * (bits 32-63) that every notification which changes the port increments. The seed in
 * DriverEntry is stored only if the generation it read is still current, so an older
 * GetTeredoPort result never overwrites a newer notification.
 */
#define STATE_PORT(state) ((USHORT)((state) & 0xFFFF))
#define STATE_GENERATION(state) ((state) & ~(LONG64)0xFFFFFFFF)
#define GENERATION_ONE ((LONG64)1 << 32)

typedef struct _TEREDO_REFERENCE_CONTEXT {
    /* Written by NotifyTeredoPortChange, possibly after the initial notification ran. */
    HANDLE NotificationHandle;
    /* Read and written with Interlocked* only: see STATE_PORT. */
    volatile LONG64 State;
    /* Callbacks that ran, including the initial one. */
    volatile LONG Notifications;
} TEREDO_REFERENCE_CONTEXT, *PTEREDO_REFERENCE_CONTEXT;

/* Non-NULL from the end of a successful DriverEntry until a successful cancel at unload. */
static PTEREDO_REFERENCE_CONTEXT g_Context;

DRIVER_INITIALIZE DriverEntry;
DRIVER_UNLOAD TeredoReferenceUnload;

/* DriverEntry runs once; the memory manager discards INIT once it returned. Unload runs at
 * PASSIVE_LEVEL only, so it may be paged. The callback and the classify routine run at up
 * to DISPATCH_LEVEL and stay in .text (non-paged). GCC has no #pragma alloc_text. */
#define INIT_CODE __attribute__((section("INIT")))
#define PAGE_CODE __attribute__((section("PAGE")))

static LONG64 ReadState(PTEREDO_REFERENCE_CONTEXT Context)
{
    /* An interlocked read: compare-exchange with equal operands never changes the value. */
    return InterlockedCompareExchange64(&Context->State, 0, 0);
}

static const char *NotificationName(MIB_NOTIFICATION_TYPE NotificationType)
{
    /* Read as an integer: a value outside the enum is possible from the OS. */
    switch ((LONG)NotificationType) {
    case MibParameterNotification:
        return "MibParameterNotification";
    case MibAddInstance:
        return "MibAddInstance";
    case MibDeleteInstance:
        return "MibDeleteInstance";
    case MibInitialNotification:
        return "MibInitialNotification";
    default:
        return NULL;
    }
}

/* PTEREDO_PORT_CHANGE_CALLBACK. Serialized by netio; IRQL <= DISPATCH_LEVEL. */
static VOID NTAPI TeredoPortChanged(PVOID CallerContext, USHORT Port,
                                    MIB_NOTIFICATION_TYPE NotificationType)
{
    PTEREDO_REFERENCE_CONTEXT context = (PTEREDO_REFERENCE_CONTEXT)CallerContext;
    LONG count = InterlockedIncrement(&context->Notifications);
    /* Only callbacks change the generation, and they never overlap: this read of it stays
     * current until the exchange below. */
    LONG64 next = STATE_GENERATION(ReadState(context)) + GENERATION_ONE;
    const char *name = NotificationName(NotificationType);

    switch ((LONG)NotificationType) {
    case MibAddInstance:
    case MibParameterNotification:
        InterlockedExchange64(&context->State, next | Port);
        break;
    case MibDeleteInstance:
        InterlockedExchange64(&context->State, next);
        break;
    default:
        /* MibInitialNotification carries Port = 0, which is not a port: keep the seed. */
        break;
    }
    if (name == NULL) {
        DbgPrintEx(DPFLTR_IHVNETWORK_ID, DPFLTR_ERROR_LEVEL,
                   "teredo-reference: notification #%ld: unknown type %d, port %hu ignored\n",
                   count, (int)NotificationType, Port);
        return;
    }
    DbgPrintEx(DPFLTR_IHVNETWORK_ID, DPFLTR_INFO_LEVEL,
               "teredo-reference: notification #%ld: %-24s port %5hu at IRQL %u\n", count, name,
               Port, (ULONG)KeGetCurrentIrql());
}

/* The classify stand-in: the port a filter would allow now; MAXULONG while not loaded.
 * IRQL <= DISPATCH_LEVEL; never called once DriverUnload has started. */
__declspec(dllexport) ULONG NTAPI TeredoMonitorClassifyPort(VOID)
{
    PTEREDO_REFERENCE_CONTEXT context = g_Context;

    if (context == NULL) {
        return MAXULONG;
    }
    return STATE_PORT(ReadState(context));
}

/* The per-packet exception check of a classify function: 1 when UDP traffic on LocalPort is
 * Teredo traffic to allow (the static port 3544, or the dynamic port when known), 0
 * otherwise and while not loaded. IRQL <= DISPATCH_LEVEL; never called once DriverUnload
 * has started. The harness times it against the Rust driver's export of the same name. */
#define TEREDO_STATIC_PORT 3544
__declspec(dllexport) UCHAR NTAPI TeredoClassify(USHORT LocalPort)
{
    PTEREDO_REFERENCE_CONTEXT context = g_Context;
    USHORT port;

    if (context == NULL) {
        return 0;
    }
    if (LocalPort == TEREDO_STATIC_PORT) {
        return 1;
    }
    port = STATE_PORT(ReadState(context));
    return (UCHAR)(port != 0 && LocalPort == port);
}

PAGE_CODE VOID TeredoReferenceUnload(PDRIVER_OBJECT DriverObject)
{
    PTEREDO_REFERENCE_CONTEXT context = g_Context;
    NTSTATUS status;

    UNREFERENCED_PARAMETER(DriverObject);
    DbgPrintEx(DPFLTR_IHVNETWORK_ID, DPFLTR_INFO_LEVEL,
               "teredo-reference: DriverUnload at IRQL %u: cancelling the registration\n",
               (ULONG)KeGetCurrentIrql());
    if (context == NULL) {
        return;
    }
    /* Waits for a callback in flight; afterwards none runs, and the context is ours. */
    status = CancelMibChangeNotify2(context->NotificationHandle);
    if (status != STATUS_SUCCESS) {
        /* The registration may still call back with this context: leaking it is the only
         * safe choice. g_Context stays set, so a later unload can try again. */
        DbgPrint("teredo-reference: DriverUnload: CancelMibChangeNotify2 failed with %#010lx; "
                 "the context stays allocated\n",
                 status);
        return;
    }
    g_Context = NULL;
    DbgPrintEx(DPFLTR_IHVNETWORK_ID, DPFLTR_INFO_LEVEL,
               "teredo-reference: DriverUnload: cancelled after %ld notifications; last port %hu\n",
               context->Notifications, STATE_PORT(ReadState(context)));
    ExFreePoolWithTag(context, TEREDO_REFERENCE_TAG);
}

INIT_CODE NTSTATUS DriverEntry(PDRIVER_OBJECT DriverObject, PUNICODE_STRING RegistryPath)
{
    PTEREDO_REFERENCE_CONTEXT context;
    NTSTATUS status;
    LONG64 before;
    USHORT port = 0;

    DbgPrintEx(DPFLTR_IHVNETWORK_ID, DPFLTR_INFO_LEVEL,
               "teredo-reference: DriverEntry at IRQL %u for %wZ\n", (ULONG)KeGetCurrentIrql(),
               RegistryPath);

    context = (PTEREDO_REFERENCE_CONTEXT)ExAllocatePoolWithTag(
        NonPagedPoolNx, sizeof(*context), TEREDO_REFERENCE_TAG);
    if (context == NULL) {
        DbgPrint("teredo-reference: DriverEntry: no memory for the context\n");
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    /* Complete before registering: the initial notification may run before the call
     * returns, on another thread. */
    RtlZeroMemory(context, sizeof(*context));

    status = NotifyTeredoPortChange(TeredoPortChanged, context, TRUE,
                                    &context->NotificationHandle);
    /* The documentation lists Win32 codes (positive, so NT_SUCCESS) among the failures:
     * only STATUS_SUCCESS is success. */
    if (status != STATUS_SUCCESS) {
        DbgPrint("teredo-reference: DriverEntry: NotifyTeredoPortChange failed with %#010lx\n",
                 status);
        ExFreePoolWithTag(context, TEREDO_REFERENCE_TAG);
        return NT_SUCCESS(status) ? STATUS_UNSUCCESSFUL : status;
    }

    before = ReadState(context);
    status = GetTeredoPort(&port);
    if (status == STATUS_SUCCESS) {
        /* A notification since `before` is newer than this result: then keep it. */
        InterlockedCompareExchange64(&context->State, STATE_GENERATION(before) | port, before);
    }
    g_Context = context;
    DriverObject->DriverUnload = TeredoReferenceUnload;
    DbgPrintEx(DPFLTR_IHVNETWORK_ID, DPFLTR_INFO_LEVEL,
               "teredo-reference: DriverEntry: loaded; seed %hu (GetTeredoPort status %#lx)\n",
               STATE_PORT(ReadState(context)), status);
    return STATUS_SUCCESS;
}
